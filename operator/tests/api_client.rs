//! The operator's client makes one request per API call, whatever the server answers: a real
//! kube client (the stack `Client::try_from(Config)` builds, retry layer included) against a
//! local HTTP server that answers every request 503 with `Retry-After: 1`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{Api, Client, Config};

/// Serves 503 `Retry-After: 1` to every request; returns its URL and the request count.
async fn overloaded_server() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            (
                http::StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1"), ("content-type", "application/json")],
                r#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"overloaded","reason":"ServiceUnavailable","code":503}"#,
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

fn config(url: &str) -> Config {
    Config::new(url.parse().unwrap())
}

#[tokio::test]
async fn one_request_per_call_when_the_server_is_overloaded() {
    let (url, hits) = overloaded_server().await;
    let client = Client::try_from(moe_operator::api_client::without_retries(config(&url))).unwrap();
    let api: Api<ConfigMap> = Api::namespaced(client, "ns");
    let answer = tokio::time::timeout(Duration::from_secs(10), api.get_opt("placement"))
        .await
        .expect("the call returns instead of retrying");
    match answer {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 503),
        other => panic!("expected the 503, got {other:?}"),
    }
    // Given time to retry (Retry-After: 1), it did not.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(hits.load(Ordering::SeqCst), 1, "exactly one request");
}

/// Why: kube's default client retries the same call, sleeping for Retry-After between tries
/// (15 retries at most: about 15 s here, minutes with a larger Retry-After).
#[tokio::test]
async fn kube_default_client_retries_the_same_call() {
    let (url, hits) = overloaded_server().await;
    let client = Client::try_from(config(&url)).unwrap();
    let call = tokio::spawn(async move {
        let api: Api<ConfigMap> = Api::namespaced(client, "ns");
        api.get_opt("placement").await.map(|_| ())
    });
    let start = Instant::now();
    while hits.load(Ordering::SeqCst) < 2 && start.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(hits.load(Ordering::SeqCst) >= 2, "it asked again");
    assert!(!call.is_finished(), "one call, still retrying");
    call.abort();
}

/// Accepts connections and reads requests but never answers (a hung API server).
async fn silent_server() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            held.push(conn); // kept open, never written to
        }
    });
    format!("http://{addr}")
}

#[tokio::test]
async fn a_call_to_a_hung_api_server_ends_at_the_read_timeout() {
    let url = silent_server().await;
    let config = moe_operator::api_client::for_calls(config(&url), Duration::from_secs(1));
    let api: Api<ConfigMap> = Api::namespaced(Client::try_from(config).unwrap(), "ns");
    let start = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), api.get_opt("placement"))
        .await
        .expect("the call ends on its own read timeout");
    assert!(answer.is_err(), "a hung server is an error, got {answer:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "ended after {:?}",
        start.elapsed()
    );
}

/// Why: kube's default configuration has no read timeout, so the same call waits forever.
#[tokio::test]
async fn kube_default_client_waits_on_a_hung_api_server() {
    let url = silent_server().await;
    let api: Api<ConfigMap> = Api::namespaced(Client::try_from(config(&url)).unwrap(), "ns");
    let answer = tokio::time::timeout(Duration::from_secs(3), api.get_opt("placement")).await;
    assert!(answer.is_err(), "still waiting after 3 s");
}
