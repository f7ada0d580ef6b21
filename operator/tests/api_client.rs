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
