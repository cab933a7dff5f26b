//! Test helper: runs the PHP command-line interpreter, so the codecs can be
//! checked against PHP itself. Tests that use it pass without checking
//! anything (and say so) where `php` is not installed.

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `php -r code` with `stdin` and returns what it prints, or `None` when
/// there is no `php` on this machine. Panics if PHP fails.
pub fn run(code: &str, stdin: &[u8]) -> Option<Vec<u8>> {
    let spawned = Command::new("php")
        .args(["-d", "display_errors=stderr", "-r", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("php is not installed: the comparison with PHP is skipped");
            return None;
        }
        Err(e) => panic!("cannot start php: {e}"),
    };
    let mut input = child.stdin.take().expect("php stdin is piped");
    let stdin = stdin.to_vec();
    // Written from another thread so that neither side blocks on a full pipe.
    let writer = std::thread::spawn(move || input.write_all(&stdin));
    let output = child.wait_with_output().expect("php runs");
    writer
        .join()
        .expect("stdin writer")
        .expect("php reads its stdin");
    assert!(
        output.status.success(),
        "php failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some(output.stdout)
}

/// [`run`], one output line per item.
pub fn lines(code: &str, stdin: &[u8]) -> Option<Vec<String>> {
    let out = run(code, stdin)?;
    Some(
        String::from_utf8(out)
            .expect("php printed UTF-8")
            .lines()
            .map(str::to_owned)
            .collect(),
    )
}
