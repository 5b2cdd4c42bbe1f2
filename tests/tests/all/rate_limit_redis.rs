//! Rate limits shared by replicas through Redis (`host/src/tenancy/limiter.rs`, `RedisLimiter`),
//! with a real `redis-server` started by the test (`kiln_tests::redis`) and two servers in this
//! process standing for two replicas:
//!
//! - a tenant's burst is one burst across both: 20 requests at once, alternating between the
//!   replicas, admit exactly the plan's burst of 5 (without Redis each replica admits its own 5);
//!   the refused get 429 with a `Retry-After` that is enough;
//! - while Redis is down, `rate_limit_on_error = "deny"` answers 503 `overloaded` with
//!   `Retry-After: 1` and counts it in `kiln_rate_limiter_errors_total`; `"allow"` admits; once
//!   Redis is back, requests are counted again without a restart.

use std::time::{Duration, Instant};

use kiln_host::tenancy::{OnLimiterError, Plan};
use kiln_tests::redis::RedisServer;
use kiln_tests::{add_user, fixture_onnx, plugin, ModelsDir, TestServer};
use serde_json::json;

const EMBED: &str = "/v1/inference/embeddings";
const MODEL: &str = "test/probe";

/// The sandbox probe as `test/probe` (`"ok"` answers at once).
fn probe_models() -> ModelsDir {
    let models = ModelsDir::new();
    models.add(
        MODEL,
        &format!(
            "task = \"embeddings\"\n[plugin]\npath = {:?}\n[graphs]\nmain = \"main.onnx\"\n",
            plugin("sandbox-probe")
        ),
        &[("main.onnx", &fixture_onnx("main.onnx"))],
    );
    models
}

/// A replica: rate limits in `redis` (or in-process when None), plan `tight` (60/min, burst
/// 5), and user `burst` on it; returns the server and that user's token.
async fn replica(
    models: &ModelsDir,
    redis: Option<String>,
    on_error: OnLimiterError,
) -> (TestServer, String) {
    let mut config = kiln_tests::config(models.path());
    config.plans.insert(
        "tight".into(),
        Plan {
            requests_per_minute: 60,
            burst: Some(5),
            compute_hours: 1e6,
            tasks: Default::default(),
        },
    );
    config.redis_url = redis;
    config.rate_limit_on_error = on_error;
    let server = TestServer::start(config).await;
    let token = add_user(&server.state, "burst", "tight");
    (server, token)
}

/// The id of user `burst` on `server`: replicas share a database, so their ids (the limiter's
/// keys) agree; these test servers each have their own, created in the same order.
fn burst_user_id(server: &TestServer) -> i64 {
    server
        .state
        .tenancy
        .snapshot()
        .user_by_name("burst")
        .expect("user burst")
        .id
}

/// One embeddings call as `token`: status and `Retry-After`.
async fn call(server: &TestServer, token: &str) -> (u16, Option<u64>) {
    let response = reqwest::Client::new()
        .post(server.url(EMBED))
        .bearer_auth(token)
        .json(&json!({"model": MODEL, "inputs": ["ok"]}))
        .send()
        .await
        .expect("request");
    let retry = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (response.status().as_u16(), retry)
}

/// 20 requests at once, alternating between `a` and `b`: their statuses and `Retry-After`s.
async fn burst(a: &(TestServer, String), b: &(TestServer, String)) -> Vec<(u16, Option<u64>)> {
    let calls = (0..20).map(|i| {
        let (server, token) = if i % 2 == 0 { a } else { b };
        call(server, token)
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_sharing_redis_admit_one_burst_between_them() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let models = probe_models();
    let a = replica(&models, Some(redis.url()), OnLimiterError::Deny).await;
    let b = replica(&models, Some(redis.url()), OnLimiterError::Deny).await;
    assert_eq!(burst_user_id(&a.0), burst_user_id(&b.0));
    let answers = burst(&a, &b).await;
    let admitted = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(
        admitted, 5,
        "one burst of 5 across both replicas: {answers:?}"
    );
    for (status, retry) in &answers {
        if *status != 200 {
            assert_eq!(*status, 429, "{answers:?}");
            // One request a second at 60/min: a second's wait is enough (and the header rounds
            // up, so never 0).
            assert!(retry.is_some_and(|r| (1..=2).contains(&r)), "{answers:?}");
        }
    }
    // Waiting what Retry-After said admits the next request, on either replica.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(call(&b.0, &b.1).await.0, 200);

    // The same two replicas without Redis: each counts alone, so together they admit twice.
    let a = replica(&models, None, OnLimiterError::Deny).await;
    let b = replica(&models, None, OnLimiterError::Deny).await;
    let admitted = burst(&a, &b)
        .await
        .iter()
        .filter(|(s, _)| *s == 200)
        .count();
    assert_eq!(admitted, 10, "in-process limiters: 5 per replica");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_deny_answers_503_allow_admits_and_both_recover() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let models = probe_models();
    let deny = replica(&models, Some(redis.url()), OnLimiterError::Deny).await;
    let allow = replica(&models, Some(redis.url()), OnLimiterError::Allow).await;
    // Another user on the `allow` replica, so that the two replicas' counts stay apart.
    let allow = {
        let token = add_user(&allow.0.state, "other", "tight");
        (allow.0, token)
    };
    assert_eq!(call(&deny.0, &deny.1).await.0, 200);

    redis.stop();
    let response = reqwest::Client::new()
        .post(deny.0.url(EMBED))
        .bearer_auth(&deny.1)
        .json(&json!({"model": MODEL, "inputs": ["ok"]}))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: serde_json::Value = response.json().await.expect("error JSON");
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    assert!(deny.0.metric("kiln_rate_limiter_errors_total").await >= 1);
    // `allow`: admitted, uncounted (more than the burst gets through).
    for _ in 0..8 {
        assert_eq!(call(&allow.0, &allow.1).await.0, 200);
    }

    // Redis comes back (empty): both count again, without a restart.
    redis.resume();
    let began = Instant::now();
    while call(&deny.0, &deny.1).await.0 != 200 {
        assert!(
            began.elapsed() < Duration::from_secs(20),
            "the server did not reconnect to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("admitted again {:?} after Redis returned", began.elapsed());
    let statuses: Vec<u16> =
        futures_util::future::join_all((0..10).map(|_| call(&allow.0, &allow.1)))
            .await
            .into_iter()
            .map(|(s, _)| s)
            .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "counted again after Redis returned: {statuses:?}"
    );
}
