//! Tenancy over real HTTP, with the `sandbox-probe` fixture plugin as the model: bearer tokens
//! (401/403), private, public and shared models (403/404), plan rate limits and compute quotas
//! (429 with their headers), expiry and revocation seen by a running server (the revocation made
//! by the `kiln admin` CLI in another process), per-tenant plugin instances, the admin HTTP API's
//! errors, and the usage report.
//!
//! Every test runs its own server on its own fresh database, and adds its own users and plans.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_host::config::Config;
use kiln_host::tenancy::{self, admin, Plan, Scope, TokenRecord};
use kiln_host::AppState;
use kiln_tests::{add_user, fixture_onnx, plugin, ModelsDir, Reply, TestServer, TEST_PLAN};
use serde_json::{json, Value};

/// `WWW-Authenticate` of a 401 for a token that was sent but is not usable.
const INVALID_TOKEN: &str = "Bearer error=\"invalid_token\"";

/// A models folder serving the sandbox probe (graph `main`) under each of `ids`.
fn probe_models(ids: &[&str]) -> ModelsDir {
    let models = ModelsDir::new();
    let wasm = plugin("sandbox-probe");
    let toml = format!(
        "task = \"embeddings\"\n[plugin]\npath = {wasm:?}\n[graphs]\nmain = \"main.onnx\"\n"
    );
    for id in ids {
        models.add(id, &toml, &[("main.onnx", &fixture_onnx("main.onnx"))]);
    }
    models
}

/// The test configuration for `models` with these extra plans.
fn config_with_plans(models: &ModelsDir, plans: &[(&str, Plan)]) -> Config {
    let mut config = kiln_tests::config(models.path());
    for (name, plan) in plans {
        config.plans.insert((*name).to_owned(), plan.clone());
    }
    config
}

fn plan(requests_per_minute: u32, burst: u32, compute_hours: f64) -> Plan {
    Plan {
        requests_per_minute,
        burst: Some(burst),
        compute_hours,
        tasks: BTreeMap::new(),
    }
}

/// A client that sends no token of its own (`TestServer::client` always sends tester's).
fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// Reads a response; an empty body (204) is `null`.
async fn read(response: reqwest::Response) -> Reply {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("body is not JSON ({e}): {text}"))
    };
    Reply {
        status,
        headers,
        body,
    }
}

/// Sends `request` with `Authorization: <authorization>` (none when None).
async fn send(request: reqwest::RequestBuilder, authorization: Option<&str>) -> Reply {
    let request = match authorization {
        Some(value) => request.header("Authorization", value),
        None => request,
    };
    read(request.send().await.expect("request")).await
}

/// Runs probe `command` on `model` with this `Authorization` header value.
async fn embed_as(base: &str, authorization: Option<&str>, model: &str, command: &str) -> Reply {
    let request = client()
        .post(format!("{base}/v1/inference/embeddings"))
        .json(&json!({"model": model, "inputs": [command]}));
    send(request, authorization).await
}

/// Runs probe `command` on `model` as the holder of `token`.
async fn embed(base: &str, token: &str, model: &str, command: &str) -> Reply {
    embed_as(base, Some(&format!("Bearer {token}")), model, command).await
}

/// An admin-API (or any) request as the holder of `token`.
async fn call(
    base: &str,
    method: reqwest::Method,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Reply {
    let mut request = client().request(method, format!("{base}{path}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    send(request, Some(&format!("Bearer {token}"))).await
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply
        .headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header in {reply:?}"))
        .to_str()
        .expect("header value")
}

/// The probe's answer to `ok`.
fn ok_embedding() -> Value {
    json!({"embeddings": [[2.0, 4.0, 6.0, 8.0]]})
}

fn assert_ok(reply: &Reply) {
    assert_eq!(reply.status, 200, "{:?}", reply.body);
    assert_eq!(reply.body, ok_embedding());
}

/// Asserts an error's status, code and (a part of) its message.
fn assert_error(reply: &Reply, status: u16, code: &str, message: &str) {
    assert_eq!(
        (reply.status, reply.code()),
        (status, code),
        "{:?}",
        reply.body
    );
    assert!(
        reply.message().contains(message),
        "expected {message:?} in {:?}",
        reply.message()
    );
}

// 1. Tokens -----------------------------------------------------------------------------------

/// No token, a header that is not `Bearer <token>`, and a token nobody issued are 401s, with the
/// `WWW-Authenticate` challenge that tells them apart (RFC 6750: no error code when no token was
/// sent). Scopes are kept apart: an admin token cannot run inference, an inference token cannot
/// administer (403: authenticated, not allowed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_malformed_and_invalid_tokens_are_401_and_scopes_do_not_mix() {
    let models = probe_models(&["test/probe"]);
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let base = &server.base;

    let missing = embed_as(base, None, "test/probe", "ok").await;
    assert_error(&missing, 401, "unauthorized", "missing API token");
    assert_eq!(header(&missing, "www-authenticate"), "Bearer");

    for malformed in [
        "Basic dGVzdGVyOnNlY3JldA==",
        "Bearer",
        "Bearer    ",
        "kiln_abc",
    ] {
        let r = embed_as(base, Some(malformed), "test/probe", "ok").await;
        assert_error(&r, 401, "unauthorized", "malformed Authorization header");
        assert_eq!(header(&r, "www-authenticate"), INVALID_TOKEN, "{malformed}");
    }

    // Well-formed, never issued: a valid-looking token and the real one with a byte changed.
    let mut altered = server.token.clone();
    let last = altered.pop().expect("token");
    altered.push(if last == '0' { '1' } else { '0' });
    for invalid in [format!("kiln_{}", "0".repeat(64)), altered] {
        let r = embed(base, &invalid, "test/probe", "ok").await;
        assert_error(&r, 401, "unauthorized", "invalid API token");
        assert_eq!(header(&r, "www-authenticate"), INVALID_TOKEN);
    }

    // The real token works (the control for all of the above).
    assert_ok(&embed(base, &server.token, "test/probe", "ok").await);

    // An admin token on inference: 403, and it says why.
    let r = embed(base, &server.admin_token, "test/probe", "ok").await;
    assert_error(
        &r,
        403,
        "forbidden",
        "this is an admin token: inference needs an inference token",
    );
    assert!(r.headers.get("www-authenticate").is_none());

    // An inference token on the admin API: 403; no token there: 401.
    let body = json!({"name": "mallory", "plan": "free"});
    let r = call(
        base,
        reqwest::Method::POST,
        "/admin/users",
        &server.token,
        Some(body.clone()),
    )
    .await;
    assert_error(&r, 403, "forbidden", "this route needs an admin token");
    let r = send(client().post(server.url("/admin/users")).json(&body), None).await;
    assert_error(&r, 401, "unauthorized", "missing API token");
    assert_eq!(header(&r, "www-authenticate"), "Bearer");
    // Nothing was created by the refused calls.
    assert!(server
        .state
        .tenancy
        .snapshot()
        .user_by_name("mallory")
        .is_none());
}

// 2. Visibility -------------------------------------------------------------------------------

/// A server started as `kiln` starts: unlike [`TestServer`], it does not make its models public,
/// so a model without a stored visibility keeps the default (private to its namespace's owner).
struct PlainServer {
    base: String,
    state: Arc<AppState>,
    admin_token: String,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl PlainServer {
    async fn start(config: &Config) -> PlainServer {
        kiln_tests::init_logging();
        let state = kiln_host::load(config).await.expect("server loads");
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(kiln_host::serve(listener, Arc::clone(&state), async move {
            let _ = rx.await;
        }));
        let admin_token = {
            let tenancy = &state.tenancy;
            let store = tenancy.store().as_ref();
            admin::create_user(store, tenancy.plans(), "admin", TEST_PLAN).expect("admin");
            // Visibility is what this server leaves alone; plugins are allowed as an admin would.
            for model in state.inference.models() {
                admin::allow_plugin(store, &model.plugin_digest, "test").expect("allow");
            }
            let token = admin::create_token(store, "admin", Scope::Admin, None)
                .expect("admin token")
                .token;
            tenancy.refresh().expect("refresh");
            token
        };
        PlainServer {
            base,
            state,
            admin_token,
            _shutdown: tx,
        }
    }
}

/// `alice/private` has no stored visibility: alice (the owner of namespace `alice`) may call it,
/// tester gets 403 with the exact message, until it is shared with tester; unsharing takes that
/// back. `alice/public`, once set public, serves any valid token. An unknown model is 404 for
/// everyone, in alice's namespace too (existence is checked before access). Changes go through
/// both the admin HTTP API and the store functions `kiln admin` uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_models_serve_their_owner_and_whom_they_are_shared_with() {
    const PRIVATE: &str = "No access to this model: it is private";
    let models = probe_models(&["alice/private", "alice/public"]);
    let server = PlainServer::start(&kiln_tests::config(models.path())).await;
    let (base, state) = (&server.base, &server.state);
    let alice = add_user(state, "alice", TEST_PLAN);
    let tester = add_user(state, "tester", TEST_PLAN);
    let store = state.tenancy.store().as_ref();

    // Private by default: the owner only.
    assert!(state.tenancy.snapshot().visibility.is_empty());
    assert_ok(&embed(base, &alice, "alice/private", "ok").await);
    let r = embed(base, &tester, "alice/private", "ok").await;
    assert_error(&r, 403, "forbidden", PRIVATE);
    assert_eq!(r.message(), PRIVATE, "the exact message");

    // Shared with tester through the admin HTTP API (the server applies it at once).
    let shares = "/admin/models/alice/private/shares/tester";
    let r = call(
        base,
        reqwest::Method::PUT,
        shares,
        &server.admin_token,
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_ok(&embed(base, &tester, "alice/private", "ok").await);
    // Unshared through the store (as `kiln admin model unshare` does), then reloaded.
    admin::share(store, "alice/private", "tester", false).expect("unshare");
    state.tenancy.refresh().expect("refresh");
    assert_error(
        &embed(base, &tester, "alice/private", "ok").await,
        403,
        "forbidden",
        PRIVATE,
    );
    // Shared through the store, unshared through the HTTP API.
    admin::share(store, "alice/private", "tester", true).expect("share");
    state.tenancy.refresh().expect("refresh");
    assert_ok(&embed(base, &tester, "alice/private", "ok").await);
    let r = call(
        base,
        reqwest::Method::DELETE,
        shares,
        &server.admin_token,
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_error(
        &embed(base, &tester, "alice/private", "ok").await,
        403,
        "forbidden",
        PRIVATE,
    );
    // The owner was never affected.
    assert_ok(&embed(base, &alice, "alice/private", "ok").await);

    // alice/public: private until set public, then anyone's; set private again through the store.
    assert_eq!(embed(base, &tester, "alice/public", "ok").await.status, 403);
    let r = call(
        base,
        reqwest::Method::PUT,
        "/admin/models/alice/public/visibility",
        &server.admin_token,
        Some(json!({"visibility": "public"})),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({"model": "alice/public", "visibility": "public"})
    );
    let bob = add_user(state, "bob", "free");
    for token in [&tester, &bob, &alice] {
        assert_ok(&embed(base, token, "alice/public", "ok").await);
    }
    // GET /v1/models lists what the caller may call.
    let r = send(
        client().get(format!("{base}/v1/models")),
        Some(&format!("Bearer {bob}")),
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.body,
        json!({"models": [{"id": "alice/public", "task": "embeddings"}]})
    );
    admin::set_visibility(store, "alice/public", "private").expect("set private");
    state.tenancy.refresh().expect("refresh");
    assert_error(
        &embed(base, &bob, "alice/public", "ok").await,
        403,
        "forbidden",
        PRIVATE,
    );

    // Unknown models: 404, also in the caller's own namespace and in a namespace it cannot read.
    for (token, model) in [
        (&tester, "alice/nope"),
        (&alice, "alice/nope"),
        (&tester, "nobody/nothing"),
    ] {
        assert_error(
            &embed(base, token, model, "ok").await,
            404,
            "model_not_found",
            "Model not found",
        );
    }
}

// 3. Rate limits ------------------------------------------------------------------------------

/// A rested tenant on a plan with burst B = 5 sends B + 1 requests at once: exactly B are
/// served and one is refused with 429 `rate_limited`, a whole-second `Retry-After` and the
/// `X-RateLimit-*` headers (on every answer). Waiting exactly `Retry-After` seconds is enough.
/// The usage report counts the refusal apart from the served requests.
///
/// 12 requests a minute (one every 5 s) rather than 60 (one a second): the B + 1 requests must
/// reach the limiter within one emission interval for the last to be refused, and 5 s is a
/// margin a loaded 2-core machine keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_the_plan_is_refused_with_a_retry_after_that_suffices() {
    const RATE: u32 = 12;
    const BURST: usize = 5;
    let models = probe_models(&["test/probe"]);
    let config = config_with_plans(&models, &[("tight", plan(RATE, BURST as u32, 1e9))]);
    let server = TestServer::start(config).await;
    let base = &server.base;
    let token = add_user(&server.state, "limited", "tight");

    let replies = futures_util::future::join_all(
        (0..=BURST).map(|_| embed(base, &token, "test/probe", "ok")),
    )
    .await;
    let (served, refused): (Vec<&Reply>, Vec<&Reply>) =
        replies.iter().partition(|r| r.status == 200);
    assert_eq!(
        (served.len(), refused.len()),
        (BURST, 1),
        "{:?}",
        replies
            .iter()
            .map(|r| (r.status, &r.body))
            .collect::<Vec<_>>()
    );
    for r in &replies {
        assert_eq!(header(r, "x-ratelimit-limit"), RATE.to_string());
    }
    for r in &served {
        assert_ok(r);
    }
    // The served requests left 4, 3, 2, 1 and 0 of the burst, in some order.
    let mut remaining: Vec<u32> = served
        .iter()
        .map(|r| header(r, "x-ratelimit-remaining").parse().expect("number"))
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, [0, 1, 2, 3, 4]);

    let refused = refused[0];
    assert_error(
        refused,
        429,
        "rate_limited",
        "rate limit of 12 requests per minute (plan tight) exceeded",
    );
    let retry_after: u64 = header(refused, "retry-after").parse().expect("seconds");
    let interval = 60 / u64::from(RATE);
    assert!(
        (1..=interval).contains(&retry_after),
        "Retry-After {retry_after} is at most one interval ({interval} s)"
    );
    assert!(
        refused
            .message()
            .ends_with(&format!("retry after {retry_after} s")),
        "{}",
        refused.message()
    );
    assert_eq!(header(refused, "x-ratelimit-remaining"), "0");
    let reset: u64 = header(refused, "x-ratelimit-reset")
        .parse()
        .expect("seconds");
    assert!(
        (1..=interval * BURST as u64).contains(&reset),
        "X-RateLimit-Reset {reset}"
    );

    // Exactly Retry-After later, a request is admitted.
    tokio::time::sleep(Duration::from_secs(retry_after)).await;
    let after = embed(base, &token, "test/probe", "ok").await;
    assert_ok(&after);
    assert_eq!(header(&after, "x-ratelimit-limit"), RATE.to_string());

    // Usage: B + 1 served on the model, one refused without a model (a refused request's body,
    // which names it, is never read).
    let report = send(
        client().get(server.url("/v1/usage")),
        Some(&format!("Bearer {token}")),
    )
    .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    let total = &report.body["total"];
    assert_eq!(total["requests"], BURST as u64 + 1, "{total}");
    assert_eq!(total["rate_limited"], 1, "{total}");
    assert_eq!(total["errors"], 0, "{total}");
    let by_model = report.body["by_model"].as_array().expect("by_model");
    assert_eq!(by_model.len(), 2, "{by_model:?}");
    let row = |model: &str| {
        by_model
            .iter()
            .find(|row| row["model"] == model)
            .unwrap_or_else(|| panic!("no row for {model:?}: {by_model:?}"))
    };
    assert_eq!(row("test/probe")["requests"], BURST as u64 + 1);
    assert_eq!(row("test/probe")["rate_limited"], 0);
    assert_eq!(row("")["rate_limited"], 1);

    // Another tenant on the same plan was never limited by this one.
    let other = add_user(&server.state, "unrelated", "tight");
    assert_ok(&embed(base, &other, "test/probe", "ok").await);
}

// 4. Compute quota ----------------------------------------------------------------------------

/// A plan whose monthly compute is tiny (1e-9 h = 3.6 µs): the first request runs (a tenant
/// under its quota is admitted, whatever the request will cost) and uses it up; the next is 429
/// `quota_exceeded`, naming the reset date (the first of next month, UTC), with `Retry-After`
/// until then. Another tenant on the same plan is unaffected: the quota is per tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_used_up_compute_quota_is_refused_until_next_month() {
    let models = probe_models(&["test/probe"]);
    let config = config_with_plans(&models, &[("tiny", plan(1_000, 100, 1e-9))]);
    let server = TestServer::start(config).await;
    let base = &server.base;
    let token = add_user(&server.state, "frugal", "tiny");

    let first = embed(base, &token, "test/probe", "ok").await;
    assert_ok(&first);
    assert_eq!(header(&first, "x-ratelimit-limit"), "1000");

    let now = tenancy::store::now_ms();
    let resets = tenancy::date(tenancy::next_month_start(now));
    let second = embed(base, &token, "test/probe", "ok").await;
    assert_error(
        &second,
        429,
        "quota_exceeded",
        "monthly compute quota of 0.000000001 hours (plan tiny) is used up",
    );
    assert!(
        second
            .message()
            .ends_with(&format!("it resets on {resets}")),
        "{}",
        second.message()
    );
    let retry_after: i64 = header(&second, "retry-after").parse().expect("seconds");
    let until_reset = (tenancy::next_month_start(now) - now) / 1000;
    assert!(
        (until_reset - 5..=until_reset + 1).contains(&retry_after),
        "Retry-After {retry_after}, {until_reset} s to {resets}"
    );
    assert_eq!(header(&second, "x-ratelimit-limit"), "1000");

    // The report shows why: compute used, the plan's limit, the reset date.
    let report = call(
        base,
        reqwest::Method::GET,
        "/admin/usage/frugal",
        &server.admin_token,
        None,
    )
    .await;
    assert_eq!(report.status, 200, "{:?}", report.body);
    assert_eq!(report.body["compute_hours_limit"], 1e-9);
    assert_eq!(report.body["resets"], resets.as_str());
    assert_eq!(report.body["total"]["requests"], 1);
    assert_eq!(report.body["total"]["rate_limited"], 1);
    let used = report.body["total"]["compute_seconds"]
        .as_f64()
        .expect("f64");
    assert!(used >= 3.6e-6, "compute {used} s must exceed the quota");

    let other = add_user(&server.state, "also-frugal", "tiny");
    assert_ok(&embed(base, &other, "test/probe", "ok").await);
}

// 5. Expiry and revocation on a running server ------------------------------------------------

/// A token that expires 5 s from now works now and is refused (401 "expired") once that time
/// has passed, without any reload: expiry is checked on each request. (5 s: the first request
/// must reach the server before then, even on a loaded machine.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_refused() {
    let models = probe_models(&["test/probe"]);
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let tenancy = &server.state.tenancy;
    let store = tenancy.store().as_ref();
    let user = admin::create_user(store, tenancy.plans(), "erin", TEST_PLAN).expect("user");
    let (token, hash, id) = tenancy::new_token();
    let now = tenancy::store::now_ms();
    store
        .insert_token(&TokenRecord {
            id,
            user_id: user.id,
            hash,
            scope: Scope::Inference,
            created_at_ms: now,
            expires_at_ms: Some(now + 5_000),
            revoked: false,
        })
        .expect("insert token");
    tenancy.refresh().expect("refresh");

    assert_ok(&embed(&server.base, &token, "test/probe", "ok").await);
    let left = (now + 5_000 - tenancy::store::now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(left + 500)).await;
    let r = embed(&server.base, &token, "test/probe", "ok").await;
    assert_error(&r, 401, "unauthorized", "this API token expired");
    assert_eq!(header(&r, "www-authenticate"), INVALID_TOKEN);
}

/// The `kiln` binary.
fn kiln_binary() -> PathBuf {
    kiln_tests::kiln_bin()
}

/// Runs `kiln admin --database-url <url> <args>` in another process, with no config file.
async fn kiln_admin_output(database_url: &str, args: &[&str]) -> std::process::Output {
    let mut command = std::process::Command::new(kiln_binary());
    command
        .args(["admin", "--database-url", database_url])
        .args(args)
        .env_remove("KILN_CONFIG")
        .env_remove("KILN_MAX_TOKEN_LIFETIME_DAYS")
        .env("KILN_LOG", "warn");
    tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("join")
        .expect("running kiln")
}

/// Runs `kiln admin --database-url <url> <args>` in another process; returns its stdout and
/// panics with its stderr when it fails.
async fn kiln_admin(database_url: &str, args: &[&str]) -> String {
    let output = kiln_admin_output(database_url, args).await;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kiln admin {args:?} failed ({}): {}{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Token lifetimes are bounded by `max_token_lifetime_days`, over HTTP (here 30 days) and in
/// the CLI (its own configuration: the default ten years, or its flag), and a lifetime whose
/// seconds overflow (it used to wrap to an expiry already past, or in the year 197881603) is
/// refused with the same message, never wrapped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_lifetimes_are_bounded_over_http_and_in_the_cli() {
    use reqwest::Method;
    let models = probe_models(&["test/probe"]);
    let mut config = kiln_tests::config(models.path());
    config.max_token_lifetime = Duration::from_secs(30 * 86_400);
    let url = config.database_url.clone();
    let server = TestServer::start(config).await;
    let create = |expires: &'static str| {
        call(
            &server.base,
            Method::POST,
            "/admin/tokens",
            &server.admin_token,
            Some(json!({"user": "tester", "expires": expires})),
        )
    };
    for expires in [
        "31d",
        "721h",
        "99999999999999999d",
        "18446744073709551615s",
        "18446744073709551616s",
    ] {
        let r = create(expires).await;
        assert_error(
            &r,
            422,
            "invalid_input",
            &format!("invalid duration \"{expires}\": longer than the longest token lifetime, 30d"),
        );
    }
    let r = create("30d").await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let in_30_days = tenancy::date(tenancy::store::now_ms() + 30 * 86_400_000);
    assert_eq!(r.body["expires"], in_30_days.as_str());

    // The CLI: refused with the message on stderr, a failing exit status and nothing on stdout.
    for (bound, expires, longest) in [
        (None, "99999999999999999d", "3650d"),
        (None, "18446744073709551615s", "3650d"),
        (None, "3651d", "3650d"),
        (Some("30"), "31d", "30d"),
    ] {
        let mut args = match bound {
            Some(days) => vec!["--max-token-lifetime-days", days],
            None => vec![],
        };
        args.extend(["token", "create", "tester", "--expires", expires]);
        let out = kiln_admin_output(&url, &args).await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!(
                "longer than the longest token lifetime, {longest}"
            )),
            "{args:?}: {stderr}"
        );
        assert!(out.stdout.is_empty(), "{args:?}: no token printed");
    }
    let printed = kiln_admin(&url, &["token", "create", "tester", "--expires", "3650d"]).await;
    assert!(printed.trim().starts_with("kiln_"), "{printed}");
    let list = kiln_admin(&url, &["token", "list", "tester"]).await;
    let in_3650_days = tenancy::date(tenancy::store::now_ms() + 3650 * 86_400_000);
    assert!(list.contains(&format!("expires {in_3650_days}")), "{list}");
}

/// How soon a running server must apply a change another writer made to the database. Its
/// refresher looks every 250 ms, so a change is usually seen within a second; a loaded machine
/// can delay that poll, the database read and the request itself, and the tests assert that the
/// server sees the change by itself, not how fast the machine is.
const SEEN_WITHIN: Duration = Duration::from_secs(30);

/// Polls (every 50 ms, for at most `within`) until `reply` passes `done`; returns the last reply
/// and how long it took.
async fn poll_until(
    within: Duration,
    mut request: impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = Reply> + Send>>,
    done: impl Fn(&Reply) -> bool,
) -> (Reply, Duration) {
    let start = Instant::now();
    loop {
        let reply = request().await;
        if done(&reply) || start.elapsed() >= within {
            return (reply, start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The `kiln admin` CLI, another process writing the same database, creates and revokes tokens
/// of a running server: a token it prints works soon after ([`SEEN_WITHIN`]), `token list`
/// names it, and soon after `token revoke` requests with it are 401 "revoked", while the user's
/// other token keeps working. The server is never told: it sees the database change by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_created_and_revoked_by_the_cli_apply_to_a_running_server() {
    let models = probe_models(&["test/probe"]);
    let config = kiln_tests::config(models.path());
    let url = config.database_url.clone();
    let server = TestServer::start(config).await;
    let base = server.base.clone();

    // A token made through the admin HTTP API (its id is in the answer).
    let created = call(
        &base,
        reqwest::Method::POST,
        "/admin/tokens",
        &server.admin_token,
        Some(json!({"user": "tester", "expires": "30d"})),
    )
    .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["user"], "tester");
    assert_eq!(created.body["scope"], "inference");
    let expires = tenancy::date(tenancy::store::now_ms() + 30 * 86_400_000);
    assert_eq!(created.body["expires"], expires.as_str());
    let id = created.body["id"].as_str().expect("id").to_owned();
    let token = created.body["token"].as_str().expect("token").to_owned();
    assert_ok(&embed(&base, &token, "test/probe", "ok").await);

    // A token made by the CLI: printed alone on stdout, usable soon after.
    let printed = kiln_admin(&url, &["token", "create", "tester", "--expires", "7d"]).await;
    let cli_token = printed.trim().to_owned();
    assert!(
        cli_token.starts_with("kiln_") && cli_token.len() == 69 && !cli_token.contains('\n'),
        "stdout is the token alone: {printed:?}"
    );
    let (r, took) = poll_until(
        SEEN_WITHIN,
        || Box::pin(embed_owned(base.clone(), cli_token.clone())),
        |r| r.status == 200,
    )
    .await;
    assert_ok(&r);
    assert!(took <= SEEN_WITHIN, "seen after {took:?}");

    // `token list` shows both (ids, scope, expiry, state; never a secret).
    let list = kiln_admin(&url, &["token", "list", "tester"]).await;
    let line = list
        .lines()
        .find(|l| l.starts_with(&format!("{id}\t")))
        .unwrap_or_else(|| panic!("{id} not in {list}"));
    assert!(line.contains("\tinference\t"), "{line}");
    assert!(line.contains(&format!("expires {expires}")), "{line}");
    assert!(line.ends_with("\tactive"), "{line}");
    assert!(!list.contains("kiln_"), "no secret in the list: {list}");
    assert_eq!(
        list.lines().count(),
        3,
        "the helper's token and two new:\n{list}"
    );

    // Revoked by the CLI: refused soon after.
    let out = kiln_admin(&url, &["token", "revoke", &id]).await;
    assert_eq!(out.trim(), format!("revoked {id}"));
    let (r, took) = poll_until(
        SEEN_WITHIN,
        || Box::pin(embed_owned(base.clone(), token.clone())),
        |r| r.status == 401,
    )
    .await;
    assert_error(&r, 401, "unauthorized", "this API token was revoked");
    assert_eq!(header(&r, "www-authenticate"), INVALID_TOKEN);
    assert!(took <= SEEN_WITHIN, "refused after {took:?}");
    let list = kiln_admin(&url, &["token", "list", "tester"]).await;
    assert!(
        list.lines()
            .any(|l| l.starts_with(&format!("{id}\t")) && l.ends_with("\trevoked")),
        "{list}"
    );

    // Only that token: the same user's others still work.
    assert_ok(&embed(&base, &cli_token, "test/probe", "ok").await);
    assert_ok(&embed(&base, &server.token, "test/probe", "ok").await);
}

/// A change committed by another writer (here the store, without telling the server; `kiln
/// admin` in another process is the same) right after the server started is seen, like any
/// other. (The refresher once took its first poll's version as the starting
/// point and missed such a change.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_committed_right_after_startup_is_seen() {
    let models = probe_models(&["test/probe"]);
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    // No `refresh()`: the server must find it by itself, as it finds the CLI's changes.
    let token = admin::create_token(
        server.state.tenancy.store().as_ref(),
        "tester",
        Scope::Inference,
        None,
    )
    .expect("token")
    .token;
    let base = server.base.clone();
    let (r, took) = poll_until(
        SEEN_WITHIN,
        || Box::pin(embed_owned(base.clone(), token.clone())),
        |r| r.status == 200,
    )
    .await;
    assert_ok(&r);
    assert!(took <= SEEN_WITHIN, "seen after {took:?}");
}

/// [`embed`] of `ok` on `test/probe` with owned arguments (for [`poll_until`]).
async fn embed_owned(base: String, token: String) -> Reply {
    embed(&base, &token, "test/probe", "ok").await
}

// 6. Plugin instances -------------------------------------------------------------------------

/// The probe's `state` command counts its calls in a `static` of the plugin: an instance keeps
/// its memory from call to call, so the count tells which instance served. Tenant A gets 1 then
/// 2 (its instance is reused); tenant B, calling the same public model, gets 1 (an instance of
/// its own: nothing of A's is in its memory); A again gets 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_calling_one_public_model_never_share_a_plugin_instance() {
    let models = probe_models(&["test/probe"]);
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let base = &server.base;
    let a = &server.token;
    let b = add_user(&server.state, "tenant-b", TEST_PLAN);

    // `state` answers differently each time: the response cache must not answer it.
    let count = |token: &str| {
        let request = client()
            .post(format!("{base}/v1/inference/embeddings"))
            .json(&json!({"model": "test/probe", "inputs": ["state"],
                "options": {"use_cache": false}}));
        let authorization = format!("Bearer {token}");
        async move {
            let r = send(request, Some(&authorization)).await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.body["embeddings"][0][0].as_f64().expect("count")
        }
    };
    assert_eq!(count(a).await, 1.0);
    assert_eq!(count(a).await, 2.0);
    assert_eq!(count(&b).await, 1.0);
    assert_eq!(count(a).await, 3.0);
    assert_eq!(count(&b).await, 2.0);
}

// 7. Admin API errors -------------------------------------------------------------------------

/// Every wrong admin request is refused with a status and a message that says what to fix, and
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_errors_say_what_to_fix() {
    use reqwest::Method;
    let models = probe_models(&["test/probe"]);
    let config = config_with_plans(&models, &[("tight", plan(12, 5, 1.0))]);
    let plans: Vec<String> = config.plans.keys().cloned().collect();
    let server = TestServer::start(config).await;
    let (base, admin_token) = (&server.base, &server.admin_token);
    let admin = move |method: Method, path: &'static str, body: Option<Value>| {
        call(base, method, path, admin_token, body)
    };

    // Unknown plan: 422 naming every plan there is.
    let r = admin(
        Method::POST,
        "/admin/users",
        Some(json!({"name": "dave", "plan": "platinum"})),
    )
    .await;
    assert_error(
        &r,
        422,
        "invalid_input",
        "unknown plan \"platinum\": one of ",
    );
    assert!(
        r.message().ends_with(&plans.join(", ")),
        "{} names {plans:?}",
        r.message()
    );
    // The control: the same request with a real plan creates the user.
    let r = admin(
        Method::POST,
        "/admin/users",
        Some(json!({"name": "dave", "plan": "tight"})),
    )
    .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    assert_eq!(
        (r.body["name"].as_str(), r.body["plan"].as_str()),
        (Some("dave"), Some("tight"))
    );

    // Duplicate user.
    let r = admin(
        Method::POST,
        "/admin/users",
        Some(json!({"name": "dave", "plan": "free"})),
    )
    .await;
    assert_error(
        &r,
        422,
        "invalid_input",
        "a user named \"dave\" already exists",
    );
    // A name that cannot be a namespace.
    let r = admin(
        Method::POST,
        "/admin/users",
        Some(json!({"name": "a/b", "plan": "free"})),
    )
    .await;
    assert_error(&r, 422, "invalid_input", "invalid user name \"a/b\"");
    // Moving to an unknown plan; moving an unknown user.
    let r = admin(
        Method::PUT,
        "/admin/users/dave/plan",
        Some(json!({"plan": "platinum"})),
    )
    .await;
    assert_error(&r, 422, "invalid_input", "unknown plan \"platinum\"");
    let r = admin(
        Method::PUT,
        "/admin/users/nobody/plan",
        Some(json!({"plan": "free"})),
    )
    .await;
    assert_error(&r, 404, "not_found", "no user named \"nobody\"");

    // Bad visibility.
    let r = admin(
        Method::PUT,
        "/admin/models/test/probe/visibility",
        Some(json!({"visibility": "secret"})),
    )
    .await;
    assert_error(
        &r,
        422,
        "invalid_input",
        "invalid visibility \"secret\": public or private",
    );

    // Revoking an id that does not exist.
    let r = admin(Method::DELETE, "/admin/tokens/tok_000000000000", None).await;
    assert_error(
        &r,
        404,
        "not_found",
        "no token with id \"tok_000000000000\"",
    );

    // Token lifetimes: weeks are not a unit; zero is not a lifetime; a bad scope; no such user.
    let r = admin(
        Method::POST,
        "/admin/tokens",
        Some(json!({"user": "dave", "expires": "3w"})),
    )
    .await;
    assert_error(&r, 422, "invalid_input", "invalid duration \"3w\"");
    let r = admin(
        Method::POST,
        "/admin/tokens",
        Some(json!({"user": "dave", "expires": "0d"})),
    )
    .await;
    assert_error(&r, 422, "invalid_input", "must be more than zero");
    let r = admin(
        Method::POST,
        "/admin/tokens",
        Some(json!({"user": "dave", "scope": "root"})),
    )
    .await;
    assert_error(
        &r,
        422,
        "invalid_input",
        "invalid scope \"root\": inference or admin",
    );
    let r = admin(
        Method::POST,
        "/admin/tokens",
        Some(json!({"user": "nobody"})),
    )
    .await;
    assert_error(&r, 404, "not_found", "no user named \"nobody\"");

    // Sharing with an unknown user; the usage of an unknown user.
    let r = admin(Method::PUT, "/admin/models/test/probe/shares/nobody", None).await;
    assert_error(&r, 404, "not_found", "no user named \"nobody\"");
    let r = admin(Method::GET, "/admin/usage/nobody", None).await;
    assert_error(&r, 404, "not_found", "no user named \"nobody\"");

    // A body with an unknown field is a 400 naming it.
    let r = admin(
        Method::POST,
        "/admin/users",
        Some(json!({"name": "erin", "plan": "free", "admin": true})),
    )
    .await;
    assert_error(&r, 400, "bad_request", "unknown field `admin`");

    // None of it changed anything: dave has no token and is on his plan; no erin.
    let snapshot = server.state.tenancy.snapshot();
    let dave = snapshot.user_by_name("dave").expect("dave");
    assert_eq!(dave.plan, "tight");
    assert!(!snapshot.tokens.values().any(|t| t.user_id == dave.id));
    assert!(snapshot.user_by_name("erin").is_none());
}

// 8. Usage -----------------------------------------------------------------------------------

/// After N served requests, `GET /v1/usage` reports them for the caller: N requests, one entry
/// per (day, model), compute time. Only an admin token may name another user, and it must name
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_report_counts_the_callers_requests() {
    const N: u64 = 3;
    let models = probe_models(&["test/probe"]);
    let server = TestServer::start(kiln_tests::config(models.path())).await;
    let base = &server.base;
    let other = add_user(&server.state, "other", TEST_PLAN);
    for _ in 0..N {
        assert_ok(&embed(base, &server.token, "test/probe", "ok").await);
    }
    // Another user's request is not in tester's report.
    assert_ok(&embed(base, &other, "test/probe", "ok").await);

    let usage = |token: String, query: &'static str| {
        let url = server.url(&format!("/v1/usage{query}"));
        async move { send(client().get(url), Some(&format!("Bearer {token}"))).await }
    };
    let r = usage(server.token.clone(), "").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let report = &r.body;
    let now = tenancy::store::now_ms();
    let today = tenancy::date(now);
    assert_eq!(report["user"], "tester");
    assert_eq!(report["plan"], TEST_PLAN);
    assert_eq!(report["month"], tenancy::month(now).as_str());
    assert_eq!(
        report["resets"],
        tenancy::date(tenancy::next_month_start(now)).as_str()
    );
    assert_eq!(report["compute_hours_limit"], 1e9);
    let total = &report["total"];
    assert_eq!(total["requests"], N, "{total}");
    assert_eq!(
        (total["errors"].as_u64(), total["rate_limited"].as_u64()),
        (Some(0), Some(0))
    );
    // The probe reports one input token per call.
    assert_eq!(total["input_tokens"], N);
    assert_eq!(total["output_tokens"], 0);
    assert!(
        total["compute_seconds"].as_f64().expect("f64") > 0.0,
        "{total}"
    );
    let by_model = report["by_model"].as_array().expect("by_model");
    assert_eq!(by_model.len(), 1, "{by_model:?}");
    assert_eq!(by_model[0]["model"], "test/probe");
    assert_eq!(by_model[0]["requests"], N);
    let by_day = report["by_day"].as_array().expect("by_day");
    assert_eq!(by_day.len(), 1, "{by_day:?}");
    assert_eq!(by_day[0]["date"], today.as_str());
    let entries = report["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), 1, "one per (day, model): {entries:?}");
    assert_eq!(entries[0]["date"], today.as_str());
    assert_eq!(entries[0]["model"], "test/probe");
    assert_eq!(entries[0]["requests"], N);
    assert_eq!(entries[0]["compute_seconds"], total["compute_seconds"]);

    // Its own name is fine; another user's is not, for an inference token.
    let own = usage(server.token.clone(), "?user=tester").await;
    assert_eq!(own.status, 200, "{:?}", own.body);
    assert_eq!(own.body["total"], *total);
    let r = usage(server.token.clone(), "?user=other").await;
    assert_error(
        &r,
        403,
        "forbidden",
        "only an admin token may read another user's usage",
    );

    // An admin token names the user (the same report as /admin/usage/<user>), and must.
    let by_admin = usage(server.admin_token.clone(), "?user=tester").await;
    assert_eq!(by_admin.status, 200, "{:?}", by_admin.body);
    assert_eq!(by_admin.body, *report);
    let r = usage(server.admin_token.clone(), "?user=other").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["user"], "other");
    assert_eq!(r.body["total"]["requests"], 1);
    let r = usage(server.admin_token.clone(), "").await;
    assert_error(
        &r,
        400,
        "bad_request",
        "an admin token must name the user: /v1/usage?user=<name>",
    );

    // No token, or an unknown one.
    let r = send(client().get(server.url("/v1/usage")), None).await;
    assert_error(&r, 401, "unauthorized", "missing API token");
    let r = usage(format!("kiln_{}", "f".repeat(64)), "").await;
    assert_error(&r, 401, "unauthorized", "invalid API token");
}
