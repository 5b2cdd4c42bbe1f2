//! The admin HTTP API (`/admin/...`, admin token): the same operations as `kiln admin`
//! (`crate::tenancy::admin`), answered in JSON. Changes apply to this server at once and to other
//! servers on the same database within a second.

use std::sync::Arc;

use axum::extract::{FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::gate::authenticate;
use super::{models, ApiError, ApiJson, AppState};
use crate::tenancy::admin::{self, AdminError, UsageReport};
use crate::tenancy::{parse_duration, Caller, Scope};

/// A caller holding an admin token. The admin router's guard proves it before any body is read
/// and hands it to the handler; a handler that takes it checks the token itself if it is ever
/// mounted outside that router, so no admin handler can run without one.
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

impl FromRequestParts<Arc<AppState>> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, ApiError> {
        if let Some(admin) = parts.extensions.get::<Admin>() {
            return Ok(admin.clone());
        }
        authenticate(state, &parts.headers, Scope::Admin).map(Admin)
    }
}

/// The guard of every admin route: 401 without a token, 403 with a user token, before the body.
async fn admin_guard(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    match authenticate(&state, request.headers(), Scope::Admin) {
        Ok(caller) => {
            request.extensions_mut().insert(Admin(caller));
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

/// One admin route.
pub struct AdminRoute {
    pub method: Method,
    /// axum's path syntax (`{name}` for a segment).
    pub path: &'static str,
    handler: MethodRouter<Arc<AppState>>,
}

fn route(method: Method, path: &'static str, handler: MethodRouter<Arc<AppState>>) -> AdminRoute {
    AdminRoute {
        method,
        path,
        handler,
    }
}

/// Every admin route. The router is built from this table and the tests walk it, so a route
/// added here is guarded and tested without anyone remembering to.
pub fn routes() -> Vec<AdminRoute> {
    use axum::routing::{delete, get, post, put};
    vec![
        route(Method::POST, "/admin/users", post(create_user)),
        route(Method::PUT, "/admin/users/{name}/plan", put(set_plan)),
        route(Method::POST, "/admin/tokens", post(create_token)),
        route(Method::DELETE, "/admin/tokens/{id}", delete(revoke_token)),
        route(
            Method::PUT,
            "/admin/models/{ns}/{name}/visibility",
            put(set_visibility),
        ),
        route(
            Method::PUT,
            "/admin/models/{ns}/{name}/shares/{user}",
            put(share),
        ),
        route(
            Method::DELETE,
            "/admin/models/{ns}/{name}/shares/{user}",
            delete(unshare),
        ),
        route(Method::GET, "/admin/usage/{user}", get(usage)),
        route(Method::GET, "/admin/plugins", get(list_plugins)),
        route(
            Method::POST,
            "/admin/plugins",
            post(upload_plugin).layer(axum::extract::DefaultBodyLimit::max(MAX_PLUGIN_BYTES)),
        ),
        route(
            Method::DELETE,
            "/admin/plugins/{digest}",
            delete(revoke_plugin),
        ),
        route(Method::GET, "/admin/models", get(list_models)),
        route(Method::POST, "/admin/reload", post(models::reload)),
        route(
            Method::POST,
            "/admin/models/{ns}/{name}/warm",
            post(models::warm),
        ),
    ]
}

/// Largest component an admin may upload: our largest first-party plugin is ~4 MiB; a plugin
/// carrying a whole tokenizer or model in its code is past what a handler should be.
const MAX_PLUGIN_BYTES: usize = 64 << 20;

/// The admin router: [`routes`] behind `admin_guard`. JSON bodies are held to
/// `max_body_bytes`, as everywhere else.
pub fn router(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let json_limit = axum::extract::DefaultBodyLimit::max(state.max_body_bytes);
    routes()
        .into_iter()
        .fold(Router::new(), |router, r| {
            let handler = if r.path == "/admin/plugins" && r.method == Method::POST {
                r.handler
            } else {
                r.handler.layer(json_limit)
            };
            router.route(r.path, handler)
        })
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(state),
            admin_guard,
        ))
}

#[derive(Debug, Deserialize)]
struct NoteQuery {
    #[serde(default)]
    note: String,
}

/// `POST /admin/plugins?note=...` with the component's bytes as the body: inspected, then
/// allowed by its digest.
async fn upload_plugin(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    axum::extract::Query(query): axum::extract::Query<NoteQuery>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let digest = run(&state, move |s| {
        let digest = admin::allow_plugin_bytes(&body)?;
        s.tenancy.store().allow_plugin(&digest, &query.note)?;
        Ok(digest)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"digest": digest, "allowed": true})),
    ))
}

async fn list_plugins(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Json<Value>, ApiError> {
    let plugins = run(&state, |s| admin::plugins(s.tenancy.store().as_ref())).await?;
    Ok(Json(json!({ "plugins": plugins })))
}

async fn revoke_plugin(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    Path(digest): Path<String>,
) -> Result<StatusCode, ApiError> {
    run(&state, move |s| {
        admin::revoke_plugin(s.tenancy.store().as_ref(), &digest)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /admin/models`: every model with its task, plugin, owner's visibility, and whether it
/// serves (and why not).
async fn list_models(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Json<Value>, ApiError> {
    let snapshot = state.tenancy.snapshot();
    let models: Vec<Value> = state
        .inference
        .models()
        .into_iter()
        .map(|m| {
            let id = m.spec.id.to_string();
            let unavailable = state
                .tenancy
                .plugin_allowed(&m.plugin_digest, m.signature.as_ref())
                .err();
            json!({
                "id": id,
                "task": m.spec.task.to_string(),
                "plugin": m.plugin_digest,
                "visibility": snapshot.visibility.get(&id).map_or("private", |v| v.as_str()),
                "available": unavailable.is_none(),
                "reason": unavailable,
            })
        })
        .collect();
    Ok(Json(json!({ "models": models })))
}

/// Runs an admin operation on a blocking thread (SQLite is blocking), then reloads this
/// server's view so the change applies to its next request.
pub(super) async fn run<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> Result<T, AdminError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        let value = f(&state)?;
        if let Err(e) = state.tenancy.refresh() {
            tracing::error!("reloading tenancy data failed: {e:#}");
        }
        Ok(value)
    })
    .await?
}

/// The usage report of `name` (also `/v1/usage`).
pub async fn report(state: &Arc<AppState>, name: &str) -> Result<UsageReport, ApiError> {
    let name = name.to_owned();
    run(state, move |s| {
        admin::usage(s.tenancy.store().as_ref(), s.tenancy.plans(), &name)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    name: String,
    #[serde(default = "free")]
    plan: String,
}

fn free() -> String {
    "free".into()
}

async fn create_user(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiJson(body): ApiJson<NewUser>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let user = run(&state, move |s| {
        admin::create_user(
            s.tenancy.store().as_ref(),
            s.tenancy.plans(),
            &body.name,
            &body.plan,
        )
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"id": user.id, "name": user.name, "plan": user.plan})),
    ))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanBody {
    plan: String,
}

async fn set_plan(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<PlanBody>,
) -> Result<StatusCode, ApiError> {
    run(&state, move |s| {
        admin::set_plan(
            s.tenancy.store().as_ref(),
            s.tenancy.plans(),
            &name,
            &body.plan,
        )
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    user: String,
    /// `30d`, `12h`, ...
    expires: Option<String>,
    /// `inference` (default) or `admin`.
    scope: Option<String>,
}

async fn create_token(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    ApiJson(body): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<admin::NewToken>), ApiError> {
    let invalid = ApiError::invalid;
    let expires = body
        .expires
        .as_deref()
        .map(|text| parse_duration(text, state.max_token_lifetime))
        .transpose()
        .map_err(invalid)?;
    let scope = match body.scope.as_deref() {
        None | Some("inference") => Scope::Inference,
        Some("admin") => Scope::Admin,
        Some(other) => {
            return Err(invalid(format!(
                "invalid scope {other:?}: inference or admin"
            )))
        }
    };
    let token = run(&state, move |s| {
        admin::create_token(s.tenancy.store().as_ref(), &body.user, scope, expires)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(token)))
}

async fn revoke_token(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    run(&state, move |s| {
        admin::revoke_token(s.tenancy.store().as_ref(), &id)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VisibilityBody {
    visibility: String,
}

async fn set_visibility(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    Path((ns, name)): Path<(String, String)>,
    ApiJson(body): ApiJson<VisibilityBody>,
) -> Result<Json<Value>, ApiError> {
    let model = format!("{ns}/{name}");
    let visibility = run(&state, {
        let model = model.clone();
        move |s| admin::set_visibility(s.tenancy.store().as_ref(), &model, &body.visibility)
    })
    .await?;
    Ok(Json(
        json!({"model": model, "visibility": visibility.as_str()}),
    ))
}

async fn share(
    state: State<Arc<AppState>>,
    _admin: Admin,
    path: Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    set_share(state, path, true).await
}

async fn unshare(
    state: State<Arc<AppState>>,
    _admin: Admin,
    path: Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    set_share(state, path, false).await
}

/// `PUT` (`shared`) or `DELETE` of `/admin/models/<ns>/<name>/shares/<user>`.
async fn set_share(
    State(state): State<Arc<AppState>>,
    Path((ns, name, user)): Path<(String, String, String)>,
    shared: bool,
) -> Result<StatusCode, ApiError> {
    run(&state, move |s| {
        admin::share(
            s.tenancy.store().as_ref(),
            &format!("{ns}/{name}"),
            &user,
            shared,
        )
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn usage(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    Path(user): Path<String>,
) -> Result<Json<UsageReport>, ApiError> {
    report(&state, &user).await.map(Json)
}
