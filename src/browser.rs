//! What the public listener serves to browsers besides `/ws`: the client
//! library gatecast.js (clients/js, compiled into the binary) and, with
//! `--demo`, a page that tries it out (docs/client.md).

use std::net::SocketAddr;

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The library, as in clients/js/gatecast.js.
pub const LIBRARY: &str = include_str!("../clients/js/gatecast.js");

/// The demo page; `{{API}}` is the node's API base URL.
const DEMO: &str = include_str!("../clients/js/demo.html");

/// The versioned path of the library, e.g. `/gatecast-0.1.0.js`: cached for
/// a year, as its content never changes under that name.
pub fn versioned_path() -> String {
    format!("/gatecast-{}.js", env!("CARGO_PKG_VERSION"))
}

/// How long browsers and CDNs keep `/gatecast.js`: short, so a new
/// release reaches pages within minutes.
const SHORT_CACHE: &str = "public, max-age=300";
const IMMUTABLE: &str = "public, max-age=31536000, immutable";

fn library(cache: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, cache),
            // A module script from another origin is fetched with CORS.
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        LIBRARY,
    )
        .into_response()
}

/// The demo page for a node whose API listens on `api`: the curl lines it
/// shows use that address (the page itself never calls the API).
pub fn demo_page(api: SocketAddr) -> String {
    let host = if api.ip().is_unspecified() {
        format!("127.0.0.1:{}", api.port())
    } else {
        api.to_string()
    };
    DEMO.replace("{{API}}", &format!("http://{host}/api"))
        .replace("{{LIBRARY}}", &versioned_path())
}

/// The routes for the library, and for the demo page when `demo` holds.
pub fn routes<S: Clone + Send + Sync + 'static>(demo: Option<SocketAddr>) -> Router<S> {
    let router = Router::new()
        .route("/gatecast.js", get(|| async { library(SHORT_CACHE) }))
        .route(&versioned_path(), get(|| async { library(IMMUTABLE) }));
    match demo {
        Some(api) => {
            let page = demo_page(api);
            router.route(
                "/demo",
                get(move || {
                    let page = page.clone();
                    async move { ([(header::CACHE_CONTROL, "no-cache")], Html(page)) }
                }),
            )
        }
        None => router,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_page_names_the_api_and_the_versioned_library() {
        let page = demo_page("0.0.0.0:8081".parse().unwrap());
        assert!(page.contains("http://127.0.0.1:8081/api"), "{page}");
        assert!(page.contains(&versioned_path()));
        assert!(!page.contains("{{"));
        let page = demo_page("10.0.0.7:9000".parse().unwrap());
        assert!(page.contains("http://10.0.0.7:9000/api"));
    }
}
