//! The HTTP layer in process, against the real router (`app(state).oneshot(...)`), with no
//! ONNX Runtime and no wasm: auth, admin and namespace guarding, body limits, validation and
//! error codes. The state is real (SQLite tenancy in a temporary folder, the real gate and
//! handlers), and its inference layer a catalog of models that are discovered but never loaded:
//! their folders hold a placeholder plugin and graph, and ONNX Runtime is never initialised. A
//! request that would reach a plugin is outside what these tests cover (the end-to-end suite in
//! `tests/` runs those); everything before it is here, in milliseconds.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use serde_json::{json, Value};
use tower::ServiceExt;

use super::{admin, AppState};
use crate::config::Config;
use crate::infer::Inference;
use crate::tenancy::{self, admin as tenancy_admin, Scope};

/// A server state over a temporary folder, with users `alice` (plan free) and `bob`, and their
/// tokens, and an admin token.
struct Fixture {
    _dir: tempfile::TempDir,
    state: Arc<AppState>,
    alice: String,
    bob: String,
    admin: String,
}

/// `acme/<name>` model folders for the catalog: a model.toml of `task`, and placeholder plugin
/// and graph files (the catalog reads their bytes for the digest and size; nothing loads them).
fn model_folder(models: &std::path::Path, ns: &str, name: &str, task: &str) {
    let dir = models.join(ns).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plugin.wasm"), b"not a component").unwrap();
    std::fs::write(dir.join("model.onnx"), b"not a graph").unwrap();
    std::fs::write(
        dir.join("model.toml"),
        format!("task = \"{task}\"\n[plugin]\npath = \"plugin.wasm\"\n[graphs]\nmodel = \"model.onnx\"\n"),
    )
    .unwrap();
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("models");
        model_folder(&models, "alice", "sentiment", "text-classification");
        model_folder(&models, "alice", "vision", "image-classification");
        model_folder(&models, "alice", "writer", "text-generation");
        let config = Config {
            models_dir: models,
            cache_dir: dir.path().join("cache"),
            // Never loaded: a model that would load fails fast instead of finding a real one.
            ort_dylib: dir.path().join("no-onnxruntime.so"),
            database_url: dir.path().join("kiln.db").display().to_string(),
            // Small limits, so crossing them costs nothing.
            max_body_bytes: 4096,
            max_media_body_bytes: 8192,
            instance_slots: 4,
            ..Config::default()
        };
        let inference = Inference::load_without_ort(&config).expect("catalog");
        let store: Arc<dyn tenancy::Store> =
            Arc::from(tenancy::store::open(&config.database_url).unwrap());
        let plans = config.plans.clone();
        for (name, plan) in [("alice", "free"), ("bob", "free"), ("root", "free")] {
            tenancy_admin::create_user(store.as_ref(), &plans, name, plan).unwrap();
        }
        let token = |user: &str, scope| {
            tenancy_admin::create_token(store.as_ref(), user, scope, None)
                .unwrap()
                .token
        };
        let (alice, bob, admin) = (
            token("alice", Scope::Inference),
            token("bob", Scope::Inference),
            token("root", Scope::Admin),
        );
        // Alice's models are private; their plugin is allowed.
        for entry in inference.models() {
            store.allow_plugin(&entry.plugin_digest, "test").unwrap();
        }
        let tenancy = tenancy::Tenancy::start(store, plans).unwrap();
        let state = Arc::new(AppState {
            inference,
            fetcher: crate::fetch::Fetcher::new(crate::fetch_policy(&config)).unwrap(),
            max_body_bytes: config.max_body_bytes,
            max_media_body_bytes: config.max_media_body_bytes,
            max_model_file_bytes: config.max_model_file_bytes,
            stream_keepalive: config.stream_keepalive,
            connection_limits: super::server::ConnectionLimits::from_config(&config),
            max_token_lifetime: config.max_token_lifetime,
            tenancy,
            drain: super::drain::Drain::default(),
        });
        Fixture {
            _dir: dir,
            state,
            alice,
            bob,
            admin,
        }
    }

    async fn send(&self, method: Method, path: &str, token: Option<&str>, body: Body) -> Answer {
        let mut request = Request::builder().method(method).uri(path);
        if let Some(token) = token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = super::router(Arc::clone(&self.state))
            .oneshot(request.body(body).unwrap())
            .await
            .unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    async fn post(&self, path: &str, token: Option<&str>, body: Value) -> Answer {
        self.send(Method::POST, path, token, Body::from(body.to_string()))
            .await
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }

    #[track_caller]
    fn is(&self, status: StatusCode, code: &str) {
        assert_eq!(
            (self.status, self.code()),
            (status, code),
            "body: {}",
            self.body
        );
    }
}

/// A path of the route table with every `{param}` filled in.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|segment| {
            if segment.starts_with('{') {
                "x"
            } else {
                segment
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// A body no handler could take: not JSON, and over every JSON limit.
fn hostile_body() -> Body {
    Body::from(vec![b'{'; 64 * 1024])
}

#[tokio::test]
async fn every_admin_route_is_guarded_before_its_body() {
    let f = Fixture::new();
    let routes = admin::routes();
    assert!(routes.len() >= 14, "the table lists every admin route");
    for route in routes {
        let path = concrete(route.path);
        let anonymous = f
            .send(route.method.clone(), &path, None, hostile_body())
            .await;
        assert_eq!(
            (anonymous.status, anonymous.code()),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{} {path} without a token: {}",
            route.method,
            anonymous.body
        );
        assert_eq!(
            anonymous.headers.get(header::WWW_AUTHENTICATE).unwrap(),
            "Bearer"
        );
        let user = f
            .send(route.method.clone(), &path, Some(&f.alice), hostile_body())
            .await;
        assert_eq!(
            (user.status, user.code()),
            (StatusCode::FORBIDDEN, "forbidden"),
            "{} {path} with a user token: {}",
            route.method,
            user.body
        );
        // Past the guard, an admin gets the route itself: never the guard's answers.
        let admin = f
            .send(route.method.clone(), &path, Some(&f.admin), hostile_body())
            .await;
        assert!(
            admin.status != StatusCode::UNAUTHORIZED && admin.status != StatusCode::FORBIDDEN,
            "{} {path} with an admin token: {:?} {}",
            route.method,
            admin.status,
            admin.body
        );
    }
}

#[tokio::test]
async fn the_admin_table_is_the_admin_router() {
    // A method the table does not list for a path is not routed (405), and a listed one is:
    // the router is built from the table, so the two cannot drift apart.
    let f = Fixture::new();
    let answer = f
        .send(Method::PATCH, "/admin/users", Some(&f.admin), Body::empty())
        .await;
    assert_eq!(answer.status, StatusCode::METHOD_NOT_ALLOWED);
    let answer = f
        .post(
            "/admin/users",
            Some(&f.admin),
            json!({"name": "carol", "plan": "pro"}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.body);
    assert_eq!(answer.body["name"], "carol");
}

#[tokio::test]
async fn model_writes_need_the_namespace_owner_or_an_admin() {
    let f = Fixture::new();
    let toml = || Body::from("task = \"embeddings\"");
    for (method, path) in [
        (Method::PUT, "/v1/models/alice/new"),
        (Method::DELETE, "/v1/models/alice/new"),
        (Method::PUT, "/v1/models/alice/new/files/model.onnx"),
    ] {
        let anonymous = f.send(method.clone(), path, None, toml()).await;
        anonymous.is(StatusCode::UNAUTHORIZED, "unauthorized");
        let other = f.send(method.clone(), path, Some(&f.bob), toml()).await;
        other.is(StatusCode::FORBIDDEN, "forbidden");
        assert!(other.message().contains("own namespace"), "{}", other.body);
        let owner = f.send(method.clone(), path, Some(&f.alice), toml()).await;
        assert!(
            owner.status != StatusCode::UNAUTHORIZED && owner.status != StatusCode::FORBIDDEN,
            "{method} {path} by its owner: {:?} {}",
            owner.status,
            owner.body
        );
    }
}

#[tokio::test]
async fn inference_needs_an_inference_token_whatever_the_body() {
    let f = Fixture::new();
    for path in [
        "/v1/inference/embeddings",
        "/v1/inference/text-generation/stream",
        "/v1/inference/asr",
    ] {
        let anonymous = f.send(Method::POST, path, None, hostile_body()).await;
        anonymous.is(StatusCode::UNAUTHORIZED, "unauthorized");
        let admin = f
            .send(Method::POST, path, Some(&f.admin), hostile_body())
            .await;
        admin.is(StatusCode::FORBIDDEN, "forbidden");
    }
    let garbage = f
        .send(
            Method::POST,
            "/v1/inference/embeddings",
            Some("not-a-token"),
            Body::empty(),
        )
        .await;
    garbage.is(StatusCode::UNAUTHORIZED, "unauthorized");
    assert_eq!(
        garbage.headers.get(header::WWW_AUTHENTICATE).unwrap(),
        "Bearer error=\"invalid_token\""
    );
}

#[tokio::test]
async fn each_route_has_its_own_body_limit() {
    let f = Fixture::new();
    let text = "x".repeat(5000);
    // Over `max_body_bytes` (4096) on a text route: 413, and the connection closes.
    let answer = f
        .post(
            "/v1/inference/text-classification",
            Some(&f.alice),
            json!({"model": "alice/sentiment", "inputs": text}),
        )
        .await;
    answer.is(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(answer.message().contains("4096"), "{}", answer.body);
    assert_eq!(answer.headers.get(header::CONNECTION).unwrap(), "close");
    // The same size on a media route is under its own limit (8192): it gets as far as the image.
    let answer = f
        .post(
            "/v1/inference/image-classification",
            Some(&f.alice),
            json!({"model": "alice/vision", "image": text}),
        )
        .await;
    assert_ne!(
        answer.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        answer.body
    );
    let answer = f
        .post(
            "/v1/inference/image-classification",
            Some(&f.alice),
            json!({"model": "alice/vision", "image": "x".repeat(9000)}),
        )
        .await;
    answer.is(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(answer.message().contains("8192"), "{}", answer.body);
}

#[tokio::test]
async fn malformed_requests_name_what_is_wrong() {
    let f = Fixture::new();
    let embed = "/v1/inference/embeddings";
    let answer = f
        .send(Method::POST, embed, Some(&f.alice), Body::from("{not json"))
        .await;
    answer.is(StatusCode::BAD_REQUEST, "bad_request");
    let answer = f.post(embed, Some(&f.alice), json!({"inputs": "x"})).await;
    answer.is(StatusCode::BAD_REQUEST, "bad_request");
    assert!(answer.message().contains("`model`"), "{}", answer.body);
    let answer = f
        .post(
            embed,
            Some(&f.alice),
            json!({"model": "alice/nope", "inputs": "x"}),
        )
        .await;
    answer.is(StatusCode::NOT_FOUND, "model_not_found");
    // Another tenant's private model: 403, before anything runs.
    let answer = f
        .post(
            "/v1/inference/text-classification",
            Some(&f.bob),
            json!({"model": "alice/sentiment", "inputs": "x"}),
        )
        .await;
    answer.is(StatusCode::FORBIDDEN, "forbidden");
    // A model of another task: the message names the right endpoint.
    let answer = f
        .post(
            embed,
            Some(&f.alice),
            json!({"model": "alice/sentiment", "inputs": "x"}),
        )
        .await;
    answer.is(StatusCode::UNPROCESSABLE_ENTITY, "wrong_task");
    assert!(
        answer
            .message()
            .contains("/v1/inference/text-classification"),
        "{}",
        answer.body
    );
    let answer = f
        .send(Method::POST, "/v1/nothing", Some(&f.alice), Body::empty())
        .await;
    answer.is(StatusCode::NOT_FOUND, "not_found");
}

#[tokio::test]
async fn parameters_out_of_range_are_422_with_the_field_and_value() {
    let f = Fixture::new();
    let cases = [
        (
            "/v1/inference/text-classification",
            json!({"model": "alice/sentiment", "inputs": "x", "top_k": 0}),
            "`top_k` must be at least 1, got 0",
        ),
        (
            "/v1/inference/image-classification",
            json!({"model": "alice/vision", "image": "aGk=", "top_k": 0}),
            "`top_k` must be at least 1, got 0",
        ),
        (
            "/v1/inference/text-generation",
            json!({"model": "alice/writer", "prompt": "hi", "temperature": 3.5}),
            "`temperature` must be between 0.0 and 2.0, got 3.5",
        ),
        (
            "/v1/inference/text-generation",
            json!({"model": "alice/writer", "prompt": "hi", "max_tokens": 0}),
            "`max_tokens` must be at least 1, got 0",
        ),
        (
            "/v1/inference/text-generation/stream",
            json!({"model": "alice/writer", "messages": [{"role": "robot", "content": "hi"}]}),
            "`messages[0].role`",
        ),
        (
            "/v1/inference/text-generation",
            json!({"model": "alice/writer", "prompt": "hi", "stop_sequences": [""]}),
            "`stop_sequences[0]` must be 1 to 256 characters, got 0",
        ),
    ];
    for (path, body, message) in cases {
        let answer = f.post(path, Some(&f.alice), body).await;
        answer.is(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input");
        assert!(
            answer.message().contains(message),
            "{path}: {}",
            answer.body
        );
    }
    // Not base64: the host's own check, before any plugin.
    let answer = f
        .post(
            "/v1/inference/image-classification",
            Some(&f.alice),
            json!({"model": "alice/vision", "image": "***"}),
        )
        .await;
    answer.is(StatusCode::BAD_REQUEST, "bad_request");
}

#[tokio::test]
async fn every_answer_carries_the_rate_limit_and_usage_is_recorded_by_model() {
    let f = Fixture::new();
    let answer = f
        .post(
            "/v1/inference/embeddings",
            Some(&f.alice),
            json!({"model": "alice/nope", "inputs": "x"}),
        )
        .await;
    answer.is(StatusCode::NOT_FOUND, "model_not_found");
    assert_eq!(answer.headers.get("x-ratelimit-limit").unwrap(), "100");
    assert_eq!(answer.headers.get("x-kiln-cache").unwrap(), "bypass");
    // The usage record names the model the request asked for (the handler hands it back on
    // its answer), with the route's task.
    let state = Arc::clone(&f.state);
    let report = tokio::task::spawn_blocking(move || {
        let tenancy = &state.tenancy;
        tenancy_admin::usage(tenancy.store().as_ref(), tenancy.plans(), "alice").unwrap()
    })
    .await
    .unwrap();
    let report = serde_json::to_value(report).unwrap();
    let text = report.to_string();
    // A model that does not exist is recorded without the caller's string.
    assert!(!text.contains("alice/nope"), "{text}");
    assert!(text.contains(r#""model":"""#), "{text}");
}

#[tokio::test]
async fn usage_names_only_models_that_exist_and_odd_names_are_refused_first() {
    let f = Fixture::new();
    // A name that cannot be a model id: 400 before anything is looked up or recorded, and the
    // answer echoes only its start.
    let huge = format!("alice/{}", "x".repeat(3000));
    let answer = f
        .post(
            "/v1/inference/embeddings",
            Some(&f.alice),
            json!({"model": huge, "inputs": "x"}),
        )
        .await;
    answer.is(StatusCode::BAD_REQUEST, "bad_request");
    assert!(answer.body.to_string().len() < 1000, "{}", answer.body);
    // A model that exists is named in the usage record (whatever its request's outcome).
    let answer = f
        .post(
            "/v1/inference/text-classification",
            Some(&f.alice),
            json!({"model": "alice/sentiment", "inputs": "x"}),
        )
        .await;
    assert_ne!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.body);
    let state = Arc::clone(&f.state);
    let report = tokio::task::spawn_blocking(move || {
        let tenancy = &state.tenancy;
        tenancy_admin::usage(tenancy.store().as_ref(), tenancy.plans(), "alice").unwrap()
    })
    .await
    .unwrap();
    let text = serde_json::to_value(report).unwrap().to_string();
    assert!(text.contains("alice/sentiment"), "{text}");
    assert!(
        !text.contains("xxxxxxxx"),
        "{}",
        &text[..text.len().min(2000)]
    );
}

#[tokio::test]
async fn a_rate_limited_request_is_refused_from_its_headers() {
    let f = Fixture::new();
    // The free plan admits a burst of a tenth of its 100 per minute, then one every 0.6 s: 50
    // requests in a row meet the limit however slowly this machine sends them (short of 30 s).
    let mut admitted = 0;
    let mut refused = None;
    for _ in 0..50 {
        let answer = f
            .send(
                Method::POST,
                "/v1/inference/embeddings",
                Some(&f.bob),
                Body::from(r#"{"model": "alice/nope", "inputs": "x"}"#),
            )
            .await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(answer);
            break;
        }
        answer.is(StatusCode::NOT_FOUND, "model_not_found");
        admitted += 1;
    }
    assert!(admitted >= 10, "the burst admits 10, got {admitted}");
    let answer = refused.expect("the 50th request at the latest is over the limit");
    answer.is(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = answer.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1, "{retry}");
    assert_eq!(answer.headers.get("x-ratelimit-remaining").unwrap(), "0");
    // Still over the limit: a request whose body never ends gets its 429 all the same (the
    // body of a request that will not run is not read).
    let endless = futures_util::stream::repeat_with(|| {
        Ok::<_, std::io::Error>(bytes::Bytes::from_static(b"[1,"))
    });
    let answer = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        f.send(
            Method::POST,
            "/v1/inference/embeddings",
            Some(&f.bob),
            Body::from_stream(endless),
        ),
    )
    .await
    .expect("a refused request's body is not read");
    answer.is(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
}

#[tokio::test]
async fn metrics_need_an_admin_token() {
    let f = Fixture::new();
    let get = |token: Option<String>| {
        let f = &f;
        async move {
            f.send(Method::GET, "/metrics", token.as_deref(), Body::empty())
                .await
        }
    };
    get(None).await.is(StatusCode::UNAUTHORIZED, "unauthorized");
    get(Some(f.alice.clone()))
        .await
        .is(StatusCode::FORBIDDEN, "forbidden");
    let answer = f
        .send(Method::GET, "/metrics", Some(&f.admin), Body::empty())
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    // The metrics address serves them without a token, and nothing else.
    let scraper = super::metrics_router(Arc::clone(&f.state));
    let response = scraper
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let text = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&text).contains("kiln_model_loads_total"));
    let response = scraper
        .oneshot(Request::get("/v1/models").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}
