//! URLs as logs may show them: without the password and the query string,
//! where credentials hide (`redis://user:pass@host`, a Sentinel's
//! `sentinelPassword=`, a webhook's `?key=`).

/// `url` with its password replaced by `***` and its query and fragment
/// dropped: `redis://app:***@redis:6379/0`. A user-info part without a
/// `:` may be a bare password (`redis://s3cret@host`): all of it goes.
pub fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let rest = rest.split(['?', '#']).next().unwrap_or_default();
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("***@{host}"),
        },
        None => authority.to_owned(),
    };
    match scheme {
        Some(scheme) => format!("{scheme}://{authority}{path}"),
        None => format!("{authority}{path}"),
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn passwords_and_queries_are_hidden() {
        for (url, shown) in [
            ("redis://redis:6379/0", "redis://redis:6379/0"),
            (
                "redis://app:s3cret@redis:6379/0",
                "redis://app:***@redis:6379/0",
            ),
            ("rediss://:s3cret@redis", "rediss://:***@redis"),
            ("redis://s3cret@redis", "redis://***@redis"),
            (
                "redis-sentinel://s0:26379/0?sentinelServiceName=m&sentinelPassword=s3cret",
                "redis-sentinel://s0:26379/0",
            ),
            (
                "https://hooks.example/in?key=s3cret#x",
                "https://hooks.example/in",
            ),
            ("http://u:p@a@h/x", "http://u:***@h/x"),
        ] {
            assert_eq!(redact_url(url), shown, "{url}");
            assert!(!redact_url(url).contains("s3cret"));
        }
    }
}
