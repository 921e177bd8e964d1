//! `examples/axum.rs` served over real HTTP in front of a real cluster. Requires the
//! `test-util` feature.

// The example, compiled as a module: the test serves exactly the example's router. Its `main`
// and helpers are unused here.
#[allow(dead_code)]
#[path = "../examples/axum.rs"]
mod axum_example;

mod support;

use std::{net::SocketAddr, time::Duration};

use axum::{
    body::Bytes,
    http::{header, Method, Request, StatusCode},
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client as HttpClient},
    rt::TokioExecutor,
};
use tower_redis_cluster::Client;

/// Serves the example's app for `client` on an ephemeral port of 127.0.0.1.
async fn serve(client: Client) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, axum_example::app(client))
            .await
            .unwrap()
    });
    addr
}

struct Http {
    client: HttpClient<HttpConnector, Full<Bytes>>,
    base: String,
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: String,
}

impl Http {
    fn new(addr: SocketAddr) -> Self {
        Http {
            client: HttpClient::builder(TokioExecutor::new()).build_http(),
            base: format!("http://{addr}"),
        }
    }

    async fn request(&self, method: Method, path: &str, body: &'static str) -> Reply {
        let request = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), self.client.request(request))
            .await
            .expect("the HTTP request timed out")
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body: String::from_utf8(body.to_vec()).unwrap(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_over_http_lands_in_the_cluster() {
    let cluster = support::cluster(1, 1).await;
    let client = support::connected(cluster.client_builder()).await;
    let http = Http::new(serve(client).await);
    // A separate connection, straight to the nodes, to see what really landed.
    let direct = redis::cluster::ClusterClient::new(cluster.node_urls()).unwrap();
    let mut direct = direct.get_async_connection().await.unwrap();

    let put = http.request(Method::PUT, "/kv/greeting", "hello").await;
    assert_eq!(put.status, StatusCode::NO_CONTENT, "{}", put.body);
    let stored: Option<String> = redis::cmd("GET")
        .arg("kv:greeting")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some("hello"));

    let got = http.request(Method::GET, "/kv/greeting", "").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.body, "hello");
    assert_eq!(
        got.headers[header::CONTENT_TYPE],
        "application/octet-stream"
    );

    // A value written behind the service's back is served too.
    let () = redis::cmd("SET")
        .arg("kv:direct")
        .arg("from redis")
        .query_async(&mut direct)
        .await
        .unwrap();
    let got = http.request(Method::GET, "/kv/direct", "").await;
    assert_eq!(
        (got.status, got.body.as_str()),
        (StatusCode::OK, "from redis")
    );

    let missing = http.request(Method::GET, "/kv/missing", "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.body);

    for expected in ["1\n", "2\n"] {
        let incr = http.request(Method::POST, "/kv/visits/incr", "").await;
        assert_eq!(
            (incr.status, incr.body.as_str()),
            (StatusCode::OK, expected)
        );
    }
    let visits: i64 = redis::cmd("GET")
        .arg("kv:visits")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(visits, 2);

    // INCR of a value that is not a number: the server rejects the command (ErrorKind::Command).
    let incr = http.request(Method::POST, "/kv/greeting/incr", "").await;
    assert_eq!(incr.status, StatusCode::CONFLICT, "{}", incr.body);
    assert!(incr.body.contains("command"), "{}", incr.body);

    let deleted = http.request(Method::DELETE, "/kv/greeting", "").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let exists: i64 = redis::cmd("EXISTS")
        .arg("kv:greeting")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(exists, 0);
    let again = http.request(Method::DELETE, "/kv/greeting", "").await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_unreachable_cluster_is_503_with_retry_after() {
    let client = Client::builder()
        .seed("127.0.0.1:1")
        .timeout(Duration::from_millis(300))
        .build()
        .await
        .unwrap();
    let http = Http::new(serve(client).await);
    let got = http.request(Method::GET, "/kv/anything", "").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE, "{}", got.body);
    assert_eq!(got.headers[header::RETRY_AFTER], "1");
    assert!(got.body.starts_with("redis error: "), "{}", got.body);
    // The error's details (addresses, root cause) stay in the server's log.
    assert!(!got.body.contains("127.0.0.1"), "{}", got.body);
}
