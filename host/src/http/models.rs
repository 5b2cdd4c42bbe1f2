//! Registering models over HTTP, for tenants in their own namespace (and admins in any):
//!
//! ```text
//! PUT    /v1/models/{ns}/{name}/files/{file}   one file of the model folder (raw bytes)
//! PUT    /v1/models/{ns}/{name}[?replace=true] model.toml (text): checks and installs the folder
//! DELETE /v1/models/{ns}/{name}                removes the model
//! POST   /admin/reload                         looks at the whole models folder again (admin)
//! POST   /admin/models/{ns}/{name}/warm        loads a model now (admin)
//! ```
//!
//! Files go to a hidden upload folder beside the model's (`.<name>.upload`), which the registry
//! never serves; `PUT .../{name}` then checks it as a model folder and renames it into place
//! ([`crate::registry::install`]), and the server reloads. Installed or refused, the upload
//! folder is then gone (a refused one would hold disk, and it is no model). With
//! `?replace=true` the new version starts from the installed one's files, so a new model.toml
//! alone is a whole new version. The plugin is one of the files: it runs, and the model loads,
//! only once an admin has allowed its digest (or a trusted publisher signed it), as any other.
//!
//! A tenant (a non-admin token in its own namespace) is held to the server's `tenant_*`
//! settings: uploads per minute, files and disk of its models and uploads together, number of
//! models, and what its model.toml may ask for ([`registry::tenant`]). An admin token registers
//! an operator's model, bound only by `[limits]`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, RawPathParams, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::admin::{run, Admin};
use super::gate::authenticate;
use super::{ApiError, AppState, ErrorCode};
use crate::registry::{self, ModelId};
use crate::tenancy::admin::AdminError;
use crate::tenancy::{Caller, Rate, RateLimiter, Scope};

/// model.toml is a short text file; 1 MiB leaves room for a large inline config table.
const MAX_MODEL_TOML_BYTES: usize = 1 << 20;

/// The model writes, every one behind [`namespace_guard`]. (`/admin/reload` and `.../warm`,
/// whose handlers are here too, are admin routes: see `admin::routes`.)
pub fn router(state: &Arc<AppState>) -> Router<Arc<AppState>> {
    let uploads = Arc::new(Uploads {
        limiter: RateLimiter::new(),
        started: std::time::Instant::now(),
    });
    Router::new()
        .route("/v1/models/{ns}/{name}/files/{file}", put(upload_file))
        .route(
            "/v1/models/{ns}/{name}",
            put(register)
                .delete(remove)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_MODEL_TOML_BYTES)),
        )
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(state),
            namespace_guard,
        ))
        .layer(Extension(uploads))
}

/// Tenants' uploads per minute (`tenant_uploads_per_minute`), per server.
struct Uploads {
    limiter: RateLimiter,
    /// The limiter's clock starts here.
    started: std::time::Instant,
}

impl Uploads {
    /// Counts one upload of `user`; a 429 when over the rate.
    fn admit(&self, user: &str, per_minute: u32) -> Result<(), ApiError> {
        // A whole minute's uploads at once: a model's files are sent back to back.
        let rate = Rate {
            per_minute,
            burst: per_minute,
        };
        let clock = || self.started.elapsed().as_nanos() as u64;
        let decision = self.limiter.check_at(user, rate, clock);
        if decision.allowed {
            return Ok(());
        }
        let mut error = ApiError::new(
            ErrorCode::RateLimited,
            format!(
                "at most {per_minute} model uploads a minute per tenant (this server's \
                 tenant_uploads_per_minute): retry in {} s",
                decision.retry_after_secs()
            ),
        );
        error.retry_after = Some(decision.retry_after_secs().max(1));
        // The body was not read.
        error.close_connection = true;
        Err(error)
    }
}

/// A caller who may change models in the namespace of the path: an admin, or the user who owns
/// it. Only [`namespace_guard`] makes one, and every model write takes it (a write mounted
/// outside the guard fails closed: the extension is missing).
#[derive(Debug, Clone)]
struct NamespaceOwner {
    /// The user, when the token is not an admin's: a tenant, held to the `tenant_*` settings.
    tenant: Option<String>,
}

impl NamespaceOwner {
    fn of(caller: &Caller) -> NamespaceOwner {
        NamespaceOwner {
            tenant: (caller.scope != Scope::Admin).then(|| caller.user.name.clone()),
        }
    }
}

/// The guard of every model write: 401 without a token, 403 for a token of another namespace,
/// 429 for a tenant's upload over `tenant_uploads_per_minute`, before the body is read.
async fn namespace_guard(
    State(state): State<Arc<AppState>>,
    Extension(uploads): Extension<Arc<Uploads>>,
    params: RawPathParams,
    mut request: Request,
    next: Next,
) -> Response {
    let ns = params
        .iter()
        .find(|(key, _)| *key == "ns")
        .map(|(_, value)| value.to_owned())
        .unwrap_or_default();
    let owner = owner_of(&state, request.headers(), &ns).map(|caller| NamespaceOwner::of(&caller));
    let owner = owner.and_then(|owner| {
        if let Some(user) = owner
            .tenant
            .as_deref()
            .filter(|_| request.method() == "PUT")
        {
            uploads.admit(user, state.inference.config().tenant_uploads_per_minute)?;
        }
        Ok(owner)
    });
    match owner {
        Ok(owner) => {
            request.extensions_mut().insert(owner);
            next.run(request).await
        }
        Err(error) => error.into_response(),
    }
}

/// The caller, if it may change models in `ns`: an admin token, or an inference token of the
/// user who owns `ns`.
fn owner_of(state: &AppState, headers: &HeaderMap, ns: &str) -> Result<Caller, ApiError> {
    if let Ok(admin) = authenticate(state, headers, Scope::Admin) {
        return Ok(admin);
    }
    let caller = authenticate(state, headers, Scope::Inference)?;
    if caller.user.name != ns {
        return Err(ApiError::forbidden(format!(
            "you can register models only in your own namespace '{}/...', not '{ns}/...'",
            caller.user.name
        )));
    }
    Ok(caller)
}

fn model_id(ns: &str, name: &str) -> Result<ModelId, ApiError> {
    ModelId::parse(&format!("{ns}/{name}")).ok_or_else(|| {
        ApiError::invalid(
            "a model id is <namespace>/<name>, each of letters, digits, '.', '_' or '-'",
        )
    })
}

fn upload_dir(state: &AppState, id: &ModelId) -> std::path::PathBuf {
    state
        .inference
        .models_dir()
        .join(&id.namespace)
        .join(registry::tenant::upload_dir_name(&id.name))
}

/// `PUT /v1/models/{ns}/{name}/files/{file}`: streamed to disk, never whole in memory.
async fn upload_file(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<NamespaceOwner>,
    Path((ns, name, file)): Path<(String, String, String)>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = model_id(&ns, &name)?;
    // A file declared over the limit is refused before a byte of it is read.
    if super::server::declared_length(&headers).is_some_and(|n| n > state.max_model_file_bytes) {
        return Err(ApiError {
            close_connection: true,
            ..ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "a model file may be at most {} bytes",
                    state.max_model_file_bytes
                ),
            )
        });
    }
    // One plain file name: the folder is flat, and a name can never climb out of it.
    let valid = !file.is_empty()
        && file.len() <= 128
        && !file.starts_with('.')
        && file != "model.toml"
        && file
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !valid {
        return Err(ApiError::invalid(format!(
            "file name {file:?}: letters, digits, '.', '_' or '-', not starting with '.' \
             (model.toml is sent with PUT /v1/models/{ns}/{name})"
        )));
    }
    let dir = upload_dir(&state, &id);
    // What this file may take: the server's `max_model_file_bytes`, and for a tenant what is left
    // of its `tenant_max_disk_mb` (its files count once they are written).
    let max_bytes = match &owner.tenant {
        Some(user) => state
            .max_model_file_bytes
            .min(tenant_room(&state, user, dir.join(&file)).await?),
        None => state.max_model_file_bytes,
    };
    let internal = |e: std::io::Error| ApiError::internal("the file could not be stored", e);
    tokio::fs::create_dir_all(&dir).await.map_err(internal)?;
    // Written under a temporary name and renamed when complete, so an interrupted upload never
    // leaves a truncated file that a later registration would take for the real one.
    let partial = dir.join(format!(".{file}.partial"));
    let mut out = tokio::fs::File::create(&partial).await.map_err(internal)?;
    let mut stream = body.into_data_stream();
    let mut written: u64 = 0;
    let result: Result<(), ApiError> = async {
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
            written += chunk.len() as u64;
            // The server's `max_model_file_bytes` (see its reason in the config).
            if written > state.max_model_file_bytes {
                return Err(ApiError::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "a model file may be at most {} bytes",
                        state.max_model_file_bytes
                    ),
                ));
            }
            if written > max_bytes {
                let mut error = ApiError::invalid(format!(
                    "this file would take your models and uploads above this server's \
                     tenant_max_disk_mb ({} MiB): at most {max_bytes} more bytes fit",
                    state.inference.config().tenant_max_disk_bytes >> 20
                ));
                error.close_connection = true;
                return Err(error);
            }
            out.write_all(&chunk).await.map_err(internal)?;
        }
        out.flush().await.map_err(internal)?;
        Ok(())
    }
    .await;
    drop(out);
    if let Err(e) = result {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    tokio::fs::rename(&partial, dir.join(&file))
        .await
        .map_err(internal)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "model": id.to_string(), "file": file, "bytes": written })),
    ))
}

/// How many bytes tenant `user` may still write to `target` (a file of one of its upload folders,
/// which it may be replacing) within `tenant_max_disk_mb`; a 422 when the file would be one more
/// than `tenant_max_files` allows, or no byte is left.
async fn tenant_room(
    state: &Arc<AppState>,
    user: &str,
    target: std::path::PathBuf,
) -> Result<u64, ApiError> {
    let config = state.inference.config();
    let (max_files, max_bytes) = (config.tenant_max_files, config.tenant_max_disk_bytes);
    let models_dir = state.inference.models_dir().to_owned();
    let user = user.to_owned();
    let (used, replaced) = tokio::task::spawn_blocking(move || {
        let replaced = std::fs::metadata(&target).ok().map(|m| m.len());
        (registry::tenant::usage(&models_dir, &user, &[]), replaced)
    })
    .await?;
    let refuse = |message: String| {
        let mut error = ApiError::invalid(message);
        // The body was not read.
        error.close_connection = true;
        error
    };
    let files = used.files + u64::from(replaced.is_none());
    if files > max_files {
        return Err(refuse(format!(
            "your models and uploads have {} files, and this server's tenant_max_files is \
             {max_files}: remove a model (or wait for unfinished uploads to expire) first",
            used.files
        )));
    }
    let used_bytes = used.bytes - replaced.unwrap_or(0).min(used.bytes);
    if used_bytes >= max_bytes {
        return Err(refuse(format!(
            "your models and uploads take {used_bytes} bytes, and this server's \
             tenant_max_disk_mb is {} MiB: remove a model first",
            max_bytes >> 20
        )));
    }
    Ok(max_bytes - used_bytes)
}

#[derive(Debug, Deserialize)]
struct ReplaceQuery {
    #[serde(default)]
    replace: bool,
}

/// `PUT /v1/models/{ns}/{name}` with model.toml as the body: checks the uploaded folder,
/// installs it and reloads. 201 with what the server now serves (or why it does not). The upload
/// folder is removed either way.
async fn register(
    State(state): State<Arc<AppState>>,
    Extension(owner): Extension<NamespaceOwner>,
    Path((ns, name)): Path<(String, String)>,
    Query(query): Query<ReplaceQuery>,
    model_toml: String,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let id = model_id(&ns, &name)?;
    let dir = upload_dir(&state, &id);
    let answer = run(&state, move |s| {
        let installed = install_upload(s, &id, &dir, query.replace, &owner, model_toml);
        // Installed (copied out) or refused: either way the upload folder is done with. A
        // refused one left behind would hold the tenant's disk for nothing.
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(folder = %dir.display(), "removing an upload folder failed: {e}");
            }
        }
        let installed = installed?;
        let report = s.inference.reload().map_err(AdminError::Store)?;
        // Other servers on this database (sharing the models folder) load it too.
        if let Err(e) = s.tenancy.store().request("reload", "") {
            tracing::warn!("asking other servers to reload failed: {e:#}");
        }
        let key = id.to_string();
        if let Some(failure) = report.failed.iter().find(|f| f.model == key) {
            return Err(AdminError::Invalid(format!(
                "the model was installed but did not load: {}",
                failure.error
            )));
        }
        let model = s
            .inference
            .get(&key)
            .ok_or_else(|| AdminError::Invalid(format!("{key} did not load")))?;
        let unavailable = s
            .tenancy
            .plugin_allowed(&model.plugin_digest, model.signature.as_ref())
            .err();
        Ok(json!({
            "model": key,
            "status": match installed {
                registry::Installed::Added => "added",
                registry::Installed::Replaced => "replaced",
            },
            "task": model.spec.task.to_string(),
            "plugin": model.plugin_digest,
            "available": unavailable.is_none(),
            "reason": unavailable,
        }))
    })
    .await?;
    Ok((StatusCode::CREATED, Json(answer)))
}

/// Installs the upload folder `dir` with `model_toml` as `id`: copied, with the installed
/// version's files first for a replacement, into a staging folder that is checked (for a tenant
/// also against the `tenant_*` settings, see [`registry::tenant::admit`]) and renamed into place.
fn install_upload(
    s: &AppState,
    id: &ModelId,
    dir: &std::path::Path,
    replace: bool,
    owner: &NamespaceOwner,
    model_toml: String,
) -> Result<registry::Installed, AdminError> {
    std::fs::create_dir_all(dir).map_err(anyhow::Error::from)?;
    std::fs::write(dir.join("model.toml"), model_toml).map_err(anyhow::Error::from)?;
    let models_dir = s.inference.models_dir();
    // A replacement starts from the installed version's files, so changing model.toml alone
    // (or one file) needs no upload of the rest.
    let installed = registry::model_dir(models_dir, id);
    if installed.exists() && !replace {
        // Said before any other check (as `registry::install` would), and nothing copied.
        return Err(AdminError::Invalid(format!(
            "model {id} exists: pass ?replace=true to replace it"
        )));
    }
    let mut sources = vec![dir];
    if replace && installed.is_dir() {
        sources.insert(0, installed.as_path());
    }
    let staging = registry::stage_copy(models_dir, id, &sources)
        .map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
    if let Some(user) = &owner.tenant {
        let config = s.inference.config();
        if let Err(why) = registry::tenant::admit(config, models_dir, id, user, &staging, dir) {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(AdminError::Invalid(why));
        }
    }
    let (_, installed) = registry::install(models_dir, id, &staging, replace)
        .map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
    Ok(installed)
}

/// `DELETE /v1/models/{ns}/{name}`: requests in flight on it finish; new ones get 404.
async fn remove(
    State(state): State<Arc<AppState>>,
    _owner: Extension<NamespaceOwner>,
    Path((ns, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = model_id(&ns, &name)?;
    run(&state, move |s| {
        if !registry::uninstall(s.inference.models_dir(), &id).map_err(AdminError::Store)? {
            return Err(AdminError::NotFound(format!("no model {id}")));
        }
        s.inference.reload().map_err(AdminError::Store)?;
        if let Err(e) = s.tenancy.store().request("reload", "") {
            tracing::warn!("asking other servers to reload failed: {e:#}");
        }
        Ok(())
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /admin/reload`: this server looks at the models folder again; the report says what
/// was added, changed, removed, and what failed (a failed folder keeps its last good version).
pub(super) async fn reload(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
) -> Result<Json<Value>, ApiError> {
    let report = run(&state, |s| s.inference.reload().map_err(AdminError::Store)).await?;
    Ok(Json(serde_json::to_value(report).unwrap_or_default()))
}

/// `POST /admin/models/{ns}/{name}/warm`: loads the model now (waiting for it), so that its first
/// request is not a cold start.
pub(super) async fn warm(
    State(state): State<Arc<AppState>>,
    _admin: Admin,
    Path((ns, name)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let id = model_id(&ns, &name)?.to_string();
    let inference = Arc::clone(&state.inference);
    let started = std::time::Instant::now();
    let loaded = tokio::task::spawn_blocking(move || inference.warm(&id).map(|_| id)).await??;
    Ok(Json(json!({
        "model": loaded,
        "state": "loaded",
        "ms": started.elapsed().as_millis() as u64,
    })))
}
