//! `kiln admin ...`: the admin operations on the database directly (no server needed; a running
//! server sees each change within a second).

use clap::{Args, Subcommand};

use crate::config::Config;
use crate::tenancy::admin::{self, AdminError};
use crate::tenancy::{parse_duration, store, Scope};

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The database (default from the config file, else sqlite:.kiln/kiln.db).
    #[arg(long, env = "KILN_DATABASE_URL")]
    database_url: Option<String>,
    /// The models folder (default from the config file, else .kiln/models).
    #[arg(long, env = "KILN_MODELS_DIR")]
    models_dir: Option<std::path::PathBuf>,
    /// Longest lifetime of a token created here, days (default from the config file, else
    /// 3650): the server's `max_token_lifetime_days`.
    #[arg(long, env = "KILN_MAX_TOKEN_LIFETIME_DAYS", value_parser = clap::value_parser!(u64).range(1..))]
    max_token_lifetime_days: Option<u64>,
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Users (a user owns the namespace of its name).
    #[command(subcommand)]
    User(UserCommand),
    /// API tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Model visibility and sharing.
    #[command(subcommand)]
    Model(ModelCommand),
    /// A user's usage this month, per model and per day (JSON).
    Usage { user: String },
    /// The plugin allowlist: the host runs no plugin that is not on it.
    #[command(subcommand)]
    Plugin(PluginCommand),
    /// Trusted publisher keys: components they signed are allowed.
    #[command(subcommand)]
    Publisher(PublisherCommand),
    /// Asks the running servers to look at the models folder again (new, changed and removed
    /// model folders), waits for the report and prints it. Requests in flight are not dropped.
    Reload {
        /// Seconds to wait for a server's report.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

#[derive(Debug, Subcommand)]
enum PublisherCommand {
    /// Trusts the ed25519 public key in `<name>.pub` (from `kiln plugin keygen`).
    Trust {
        name: String,
        public_key_file: std::path::PathBuf,
    },
    /// Stops trusting a publisher: its components need their own allowance again.
    Untrust { name: String },
    /// Lists the trusted publishers.
    List,
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Allows a component (a .wasm file, inspected first) or a digest (sha256:...).
    Allow {
        plugin: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Revokes an allowed plugin (sha256:...): models using it stop serving at once.
    Revoke { digest: String },
    /// Lists the allowlist.
    List,
}

#[derive(Debug, Subcommand)]
enum UserCommand {
    /// Creates a user.
    Create {
        name: String,
        #[arg(long, default_value = "free")]
        plan: String,
    },
    /// Moves a user to another plan.
    SetPlan { name: String, plan: String },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Creates a token and prints it (the only time it is shown).
    Create {
        user: String,
        /// Lifetime: 30d, 12h, 90m, ...
        #[arg(long)]
        expires: Option<String>,
        /// An admin token (for /admin/... and any user's usage) instead of an inference token.
        #[arg(long)]
        admin: bool,
    },
    /// Revokes a token by its id (tok_...).
    Revoke { id: String },
    /// Lists a user's tokens (ids, scope, expiry; never the tokens).
    List { user: String },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// public: every valid token may call it; private: its owner and the users it is shared with.
    SetVisibility { model: String, visibility: String },
    /// Lets a user call a private model.
    Share { model: String, user: String },
    /// Takes that back.
    Unshare { model: String, user: String },
    /// Registers a model: copies the self-contained model folder `from` (model.toml, graphs,
    /// tokenizer and such, and the plugin) into the models folder as <namespace>/<name>, and asks
    /// the running servers to load it. The model is private to its namespace's user until made
    /// public or shared.
    Register {
        model: String,
        from: std::path::PathBuf,
        /// Replace the model if it exists (requests in flight finish on the old version).
        #[arg(long)]
        replace: bool,
        /// Seconds to wait for a server's report.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Loads a model in the running servers now, so that its first request is not a cold start.
    Warm {
        model: String,
        #[arg(long, default_value_t = 300)]
        wait: u64,
    },
    /// Removes a model's folder and asks the running servers to drop it.
    Remove {
        model: String,
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
}

/// Runs an admin command; the error says what to fix.
pub fn run(config: &Config, args: AdminArgs) -> anyhow::Result<()> {
    let url = args
        .database_url
        .unwrap_or_else(|| config.database_url.clone());
    let store = store::open(&url)?;
    let store = store.as_ref();
    let models_dir = args.models_dir.unwrap_or_else(|| config.models_dir.clone());
    let plans = &config.plans;
    let max_lifetime = args
        .max_token_lifetime_days
        .map_or(config.max_token_lifetime, crate::config::days);
    let result: Result<(), AdminError> = (|| {
        match args.command {
            AdminCommand::User(UserCommand::Create { name, plan }) => {
                let user = admin::create_user(store, plans, &name, &plan)?;
                println!("created user {} (plan {})", user.name, user.plan);
            }
            AdminCommand::User(UserCommand::SetPlan { name, plan }) => {
                admin::set_plan(store, plans, &name, &plan)?;
                println!("user {name} is on plan {plan}");
            }
            AdminCommand::Token(TokenCommand::Create {
                user,
                expires,
                admin: is_admin,
            }) => {
                let expires = expires
                    .as_deref()
                    .map(|text| parse_duration(text, max_lifetime))
                    .transpose()
                    .map_err(AdminError::Invalid)?;
                let scope = if is_admin {
                    Scope::Admin
                } else {
                    Scope::Inference
                };
                let token = admin::create_token(store, &user, scope, expires)?;
                eprintln!(
                    "created {} token {} for {}{} (shown once: store it now)",
                    token.scope,
                    token.id,
                    token.user,
                    token
                        .expires
                        .as_ref()
                        .map_or(String::new(), |d| format!(", expires {d}"))
                );
                println!("{}", token.token);
            }
            AdminCommand::Token(TokenCommand::Revoke { id }) => {
                admin::revoke_token(store, &id)?;
                println!("revoked {id}");
            }
            AdminCommand::Token(TokenCommand::List { user }) => {
                let snapshot = store.snapshot()?;
                let u = snapshot
                    .user_by_name(&user)
                    .ok_or_else(|| AdminError::NotFound(format!("no user named {user:?}")))?;
                for t in store.tokens(u.id)? {
                    println!(
                        "{}\t{}\tcreated {}\t{}\t{}",
                        t.id,
                        t.scope.as_str(),
                        crate::tenancy::date(t.created_at_ms),
                        t.expires_at_ms.map_or("no expiry".into(), |e| format!(
                            "expires {}",
                            crate::tenancy::date(e)
                        )),
                        if t.revoked { "revoked" } else { "active" }
                    );
                }
            }
            AdminCommand::Model(ModelCommand::SetVisibility { model, visibility }) => {
                let v = admin::set_visibility(store, &model, &visibility)?;
                println!("{model} is {}", v.as_str());
            }
            AdminCommand::Model(ModelCommand::Share { model, user }) => {
                admin::share(store, &model, &user, true)?;
                println!("{model} is shared with {user}");
            }
            AdminCommand::Model(ModelCommand::Unshare { model, user }) => {
                admin::share(store, &model, &user, false)?;
                println!("{model} is no longer shared with {user}");
            }
            AdminCommand::Plugin(PluginCommand::Allow { plugin, note }) => {
                let digest = admin::allow_plugin(store, &plugin, &note)?;
                println!("allowed {digest}");
            }
            AdminCommand::Plugin(PluginCommand::Revoke { digest }) => {
                admin::revoke_plugin(store, &digest)?;
                println!("revoked {digest}");
            }
            AdminCommand::Plugin(PluginCommand::List) => {
                for p in admin::plugins(store)? {
                    println!(
                        "{}\t{}\tallowed {}\t{}",
                        p.digest,
                        if p.revoked { "revoked" } else { "allowed" },
                        crate::tenancy::date(p.allowed_at_ms),
                        p.note
                    );
                }
            }
            AdminCommand::Publisher(PublisherCommand::Trust {
                name,
                public_key_file,
            }) => {
                let text = std::fs::read_to_string(&public_key_file).map_err(|e| {
                    AdminError::Invalid(format!("reading {}: {e}", public_key_file.display()))
                })?;
                let key = crate::signing::parse_public(&text).map_err(|e| {
                    AdminError::Invalid(format!("{}: {e:#}", public_key_file.display()))
                })?;
                admin::check_publisher_name(&name)?;
                store.trust_publisher(&name, &key)?;
                println!(
                    "trusting publisher {name} ({})",
                    crate::signing::fingerprint(&key)
                );
            }
            AdminCommand::Publisher(PublisherCommand::Untrust { name }) => {
                if !store.untrust_publisher(&name)? {
                    return Err(AdminError::NotFound(format!(
                        "no trusted publisher named {name:?}"
                    )));
                }
                println!("no longer trusting publisher {name}");
            }
            AdminCommand::Publisher(PublisherCommand::List) => {
                let mut publishers: Vec<_> = store.snapshot()?.publishers.into_iter().collect();
                publishers.sort();
                for (name, key) in publishers {
                    println!("{name}\t{}", crate::signing::fingerprint(&key));
                }
            }
            AdminCommand::Reload { wait } => reload(store, wait)?,
            AdminCommand::Model(ModelCommand::Register {
                model,
                from,
                replace,
                wait,
            }) => {
                let id = crate::registry::ModelId::parse(&model).ok_or_else(|| {
                    AdminError::Invalid(format!(
                        "{model:?} is not a model id: <namespace>/<name>, letters, digits, '.', '_' or '-'"
                    ))
                })?;
                let models_dir = &models_dir;
                let staging = crate::registry::stage_copy(models_dir, &id, &[from.as_path()])
                    .map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
                let (spec, installed) =
                    crate::registry::install(models_dir, &id, &staging, replace)
                        .map_err(|e| AdminError::Invalid(format!("{e:#}")))?;
                let digest = std::fs::read(&spec.plugin_path)
                    .map(|bytes| crate::plugin_tools::digest(&bytes))
                    .map_err(|e| {
                        AdminError::Invalid(format!("{}: {e}", spec.plugin_path.display()))
                    })?;
                println!(
                    "{} {id} ({}, plugin {digest}) in {}",
                    match installed {
                        crate::registry::Installed::Added => "registered",
                        crate::registry::Installed::Replaced => "replaced",
                    },
                    spec.task,
                    spec.dir.display()
                );
                let allowed = store
                    .snapshot()?
                    .plugins
                    .get(&digest)
                    .is_some_and(|p| !p.revoked);
                if !allowed {
                    println!(
                        "note: plugin {digest} is not on the allowlist (unless a trusted publisher signed it): \
                         requests will get 503 until `kiln admin plugin allow {digest}`"
                    );
                }
                reload(store, wait)?;
            }
            AdminCommand::Model(ModelCommand::Warm { model, wait }) => {
                ask(store, "warm", &model, wait)?;
            }
            AdminCommand::Model(ModelCommand::Remove { model, wait }) => {
                let id = crate::registry::ModelId::parse(&model)
                    .ok_or_else(|| AdminError::Invalid(format!("{model:?} is not a model id")))?;
                if !crate::registry::uninstall(&models_dir, &id)
                    .map_err(|e| AdminError::Invalid(format!("{e:#}")))?
                {
                    return Err(AdminError::NotFound(format!(
                        "no model folder {} under {}",
                        id,
                        models_dir.display()
                    )));
                }
                println!("removed {id}");
                reload(store, wait)?;
            }
            AdminCommand::Usage { user } => {
                let report = admin::usage(store, plans, &user)?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?
                );
            }
        }
        Ok(())
    })();
    result.map_err(|e| anyhow::anyhow!("{e}"))
}

/// Asks the servers on `store` to reload, waits up to `wait` seconds for the report, prints it.
/// No server answering is not an error: a server that starts later discovers the folders anyway.
fn reload(store: &dyn store::Store, wait: u64) -> Result<(), AdminError> {
    ask(store, "reload", "", wait)
}

/// Puts a request to the servers on `store` and prints the report of the first that does it.
fn ask(store: &dyn store::Store, kind: &str, model: &str, wait: u64) -> Result<(), AdminError> {
    let id = store.request(kind, model)?;
    let until = std::time::Instant::now() + std::time::Duration::from_secs(wait);
    loop {
        if let Some(report) = store.request_report(id)? {
            let report: serde_json::Value = serde_json::from_str(&report).unwrap_or_default();
            println!(
                "{}",
                serde_json::to_string_pretty(&report).map_err(anyhow::Error::from)?
            );
            if report.get("error").is_some()
                || report["failed"].as_array().is_some_and(|f| !f.is_empty())
            {
                return Err(AdminError::Invalid(format!(
                    "the {kind} reported failures (above)"
                )));
            }
            return Ok(());
        }
        if std::time::Instant::now() >= until {
            println!(
                "{kind} requested; no server on this database answered within {wait} s (is one \
                 running?). A server that starts later reads the models folder anyway."
            );
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
