//! The admin HTTP API (`/admin/...`, admin token): the same operations as `kiln admin`
//! (`crate::tenancy::admin`), answered in JSON. Changes apply to this server at once and to other
//! servers on the same database within a second.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{delete, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::authenticate;
use super::{ApiError, ApiJson, AppState};
use crate::tenancy::admin::{self, AdminError, UsageReport};
use crate::tenancy::{parse_duration, Scope};

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/admin/users", post(create_user))
        .route("/admin/users/{name}/plan", put(set_plan))
        .route("/admin/tokens", post(create_token))
        .route("/admin/tokens/{id}", delete(revoke_token))
        .route("/admin/models/{ns}/{name}/visibility", put(set_visibility))
        .route(
            "/admin/models/{ns}/{name}/shares/{user}",
            put(share).delete(unshare),
        )
        .route("/admin/usage/{user}", axum::routing::get(usage))
        .route(
            "/admin/plugins",
            axum::routing::get(list_plugins)
                .post(upload_plugin)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_PLUGIN_BYTES)),
        )
        .route("/admin/plugins/{digest}", delete(revoke_plugin))
        .route("/admin/models", axum::routing::get(models))
}

/// Largest component an admin may upload: our largest first-party plugin is ~4 MiB; a plugin
/// carrying a whole tokenizer or model in its code is past what a handler should be.
const MAX_PLUGIN_BYTES: usize = 64 << 20;

#[derive(Debug, Deserialize)]
struct NoteQuery {
    #[serde(default)]
    note: String,
}

/// `POST /admin/plugins?note=...` with the component's bytes as the body: inspected, then
/// allowed by its digest.
async fn upload_plugin(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<NoteQuery>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
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
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
    let plugins = run(&state, |s| admin::plugins(s.tenancy.store().as_ref())).await?;
    Ok(Json(json!({ "plugins": plugins })))
}

async fn revoke_plugin(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<StatusCode, ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
    run(&state, move |s| {
        admin::revoke_plugin(s.tenancy.store().as_ref(), &digest)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /admin/models`: every model with its task, plugin, owner's visibility, and whether it
/// serves (and why not).
async fn models(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
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

fn admin_error(e: AdminError) -> ApiError {
    match e {
        AdminError::Invalid(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", m)
        }
        AdminError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
        AdminError::Store(e) => {
            tracing::error!("admin operation failed: {e:#}");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the database operation failed",
            )
        }
    }
}

/// Runs an admin operation on a blocking thread (SQLite is blocking), then reloads this
/// server's view so the change applies to its next request.
pub(super) async fn run<T: Send + 'static>(
    state: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> Result<T, AdminError> + Send + 'static,
) -> Result<T, ApiError> {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || {
        let value = f(&state).map_err(admin_error)?;
        if let Err(e) = state.tenancy.refresh() {
            tracing::error!("reloading tenancy data failed: {e:#}");
        }
        Ok(value)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
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
    headers: HeaderMap,
    ApiJson(body): ApiJson<NewUser>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
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
    headers: HeaderMap,
    Path(name): Path<String>,
    ApiJson(body): ApiJson<PlanBody>,
) -> Result<StatusCode, ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
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
    headers: HeaderMap,
    ApiJson(body): ApiJson<NewToken>,
) -> Result<(StatusCode, Json<admin::NewToken>), ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
    let invalid = |m: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_input", m);
    let expires = body
        .expires
        .as_deref()
        .map(parse_duration)
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
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
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
    headers: HeaderMap,
    Path((ns, name)): Path<(String, String)>,
    ApiJson(body): ApiJson<VisibilityBody>,
) -> Result<Json<Value>, ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
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
    headers: HeaderMap,
    path: Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    set_share(state, headers, path, true).await
}

async fn unshare(
    state: State<Arc<AppState>>,
    headers: HeaderMap,
    path: Path<(String, String, String)>,
) -> Result<StatusCode, ApiError> {
    set_share(state, headers, path, false).await
}

/// `PUT` (`shared`) or `DELETE` of `/admin/models/<ns>/<name>/shares/<user>`.
async fn set_share(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((ns, name, user)): Path<(String, String, String)>,
    shared: bool,
) -> Result<StatusCode, ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
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
    headers: HeaderMap,
    Path(user): Path<String>,
) -> Result<Json<UsageReport>, ApiError> {
    authenticate(&state, &headers, Scope::Admin)?;
    report(&state, &user).await.map(Json)
}
