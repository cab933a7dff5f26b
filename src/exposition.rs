//! The `/metrics` page in the format the scraper asks for: the Prometheus
//! text format 0.0.4 by default (what `curl`, most agents and older
//! Prometheus servers read), OpenMetrics 1.0 when the `Accept` header
//! prefers `application/openmetrics-text` (Prometheus 2.5 and later ask for
//! it first).
//!
//! The registry encodes OpenMetrics; the 0.0.4 page is derived from it line
//! by line: samples are the same in both, only the metadata differs (a
//! counter's `# TYPE`/`# HELP` name its `_total` series, no `# UNIT`, no
//! `# EOF`, no exemplars, `unknown` is `untyped`, `info` a gauge).

/// `Content-Type` of the Prometheus text format.
pub const TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `Content-Type` of OpenMetrics.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether an `Accept` header prefers OpenMetrics to the text format: its
/// best `q` for `application/openmetrics-text` is above 0 and at least that
/// of `text/plain` (or `text/*`, `*/*`).
pub fn wants_openmetrics(accept: &str) -> bool {
    let (mut openmetrics, mut text) = (0.0f32, 0.0f32);
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" | "text/*" | "*/*" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

/// The Prometheus text format 0.0.4 of an OpenMetrics page.
pub fn to_text_0_0_4(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The family being read: its name and type. HELP comes before TYPE, so
    // it waits for the TYPE to know the name it must carry.
    let mut family = String::new();
    let mut kind = String::new();
    let mut help: Option<&str> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = Some(rest);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.rsplit_once(' ').unwrap_or((rest, "untyped"));
            family = name.to_owned();
            kind = t.to_owned();
            let (series, t) = match t {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "unknown" => (name.to_owned(), "untyped"),
                "gaugehistogram" => (name.to_owned(), "histogram"),
                "stateset" => (name.to_owned(), "gauge"),
                other => (name.to_owned(), other),
            };
            if let Some(help) = help.take() {
                let text = help.split_once(' ').map_or("", |(_, text)| text);
                out.push_str(&format!("# HELP {series} {text}\n"));
            }
            out.push_str(&format!("# TYPE {series} {t}\n"));
            continue;
        }
        if line.starts_with('#') {
            // # UNIT, # EOF: not in 0.0.4.
            continue;
        }
        // A counter's or histogram's `_created` series would read as a
        // separate untyped metric.
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        if (kind == "counter" || kind == "histogram")
            && line[..name_end].strip_prefix(family.as_str()) == Some("_created")
        {
            continue;
        }
        // Exemplars (` # {...} v`) are OpenMetrics only.
        let sample = match line.find(" # {") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_and_curl_get_what_they_ask_for() {
        // Prometheus 2.42's scrape Accept header.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(prometheus));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics(
            "application/openmetrics-text;q=0.3, text/plain;q=0.5"
        ));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
        assert!(wants_openmetrics("Application/OpenMetrics-Text"));
    }

    #[test]
    fn counters_are_named_by_their_total_series_and_openmetrics_only_lines_go() {
        let om = "# HELP gatecast_pushes Pushes accepted.\n\
                  # TYPE gatecast_pushes counter\n\
                  gatecast_pushes_total{kind=\"uid\"} 3\n\
                  gatecast_pushes_created{kind=\"uid\"} 1.7e9\n\
                  # HELP gatecast_up Up.\n\
                  # TYPE gatecast_up gauge\n\
                  # UNIT gatecast_up seconds\n\
                  gatecast_up 1\n\
                  # HELP x An x.\n\
                  # TYPE x unknown\n\
                  x 2 # {trace_id=\"1\"} 2\n\
                  # EOF\n";
        assert_eq!(
            to_text_0_0_4(om),
            "# HELP gatecast_pushes_total Pushes accepted.\n\
             # TYPE gatecast_pushes_total counter\n\
             gatecast_pushes_total{kind=\"uid\"} 3\n\
             # HELP gatecast_up Up.\n\
             # TYPE gatecast_up gauge\n\
             gatecast_up 1\n\
             # HELP x An x.\n\
             # TYPE x untyped\n\
             x 2\n"
        );
    }
}
