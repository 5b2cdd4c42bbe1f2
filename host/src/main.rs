//! `kiln`: the server binary. Parses the configuration, sets up logging, runs.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln_host::config::{Config, ServeArgs};

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Kiln inference server")]
struct Cli {
    /// Server configuration file (TOML); flags and environment variables override it.
    #[arg(long, env = "KILN_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// `kiln` alone serves, with these options (after a subcommand, its own options apply).
    #[command(flatten)]
    serve: ServeArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve(Box<ServeArgs>),
    /// Manage users, tokens, model visibility and sharing; show usage.
    Admin(kiln_host::cli::AdminArgs),
    /// Tools for plugin authors.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Debug, Subcommand)]
enum PluginCommand {
    /// Writes a plugin crate for a task into `dir` (new or empty): a handler that serves the
    /// task's demo model, its Cargo.toml, a model.toml.example and a README.
    New {
        /// embeddings, text-classification, image-classification, object-detection, asr or
        /// text-generation.
        task: String,
        /// The crate's folder (its name becomes the package's).
        dir: PathBuf,
        /// The kiln-sdk crate to depend on (default: the one this kiln was built with).
        #[arg(long)]
        sdk_path: Option<PathBuf>,
    },
    /// Which kiln:plugin world a component targets, what it imports, its size and digest.
    Inspect { file: PathBuf },
    /// Builds the plugin crate in `dir` for wasm32-wasip2 (release), inspects the component and
    /// prints its digest last.
    Build { dir: PathBuf },
    /// Makes a publisher key pair: `<name>.key` (secret, mode 0600) and `<name>.pub`.
    Keygen { name: String },
    /// Signs a component's digest: writes `<file.wasm>.sig` beside it.
    Sign {
        #[arg(long)]
        key: PathBuf,
        file: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    // Before any thread starts (see its documentation: memory at rest).
    kiln_host::os::use_one_malloc_arena();
    // Errors end the process with a message to act on (never a backtrace).
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = match cli.command {
        Some(Command::Serve(args)) => *args,
        Some(Command::Admin(admin)) => {
            let config = Config::load(cli.config.as_deref(), &ServeArgs::default())?;
            return kiln_host::cli::run(&config, admin);
        }
        Some(Command::Plugin(PluginCommand::Inspect { file })) => {
            return inspect(&file);
        }
        Some(Command::Plugin(PluginCommand::Keygen { name })) => return keygen(&name),
        Some(Command::Plugin(PluginCommand::Build { dir })) => return build(&dir),
        Some(Command::Plugin(PluginCommand::New {
            task,
            dir,
            sdk_path,
        })) => return new_plugin(&task, &dir, sdk_path.as_deref()),
        Some(Command::Plugin(PluginCommand::Sign { key, file })) => return sign(&key, &file),
        None => cli.serve,
    };
    // Configuration errors surface here, before any model loads or port is bound.
    let config = Config::load(cli.config.as_deref(), &args)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(kiln_host::run(config))
}

/// `kiln plugin inspect`: exits 1 when the host would refuse the component.
fn inspect(file: &std::path::Path) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let found = kiln_host::plugin_tools::inspect(&bytes)?;
    println!(
        "world:   {}",
        found
            .world
            .as_deref()
            .unwrap_or("(none: not a Kiln plugin)")
    );
    println!("size:    {} bytes", found.size);
    println!("imports:");
    for import in &found.imports {
        let mark = if kiln_host::plugin_tools::allowed_import(import) {
            ""
        } else {
            "   <- not allowed"
        };
        println!("  {import}{mark}");
    }
    println!("exports:");
    for export in &found.exports {
        println!("  {export}");
    }
    println!("{}", found.digest);
    if let Some(why) = found.refusal() {
        eprintln!("refused: {why}");
        std::process::exit(1);
    }
    Ok(())
}

/// `kiln plugin keygen <name>`: refuses to overwrite an existing key.
fn keygen(name: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let (secret, public) = kiln_host::signing::keygen();
    let (key_path, pub_path) = (format!("{name}.key"), format!("{name}.pub"));
    for path in [&key_path, &pub_path] {
        if std::path::Path::new(path).exists() {
            anyhow::bail!("{path} exists: choose another name or move it away");
        }
    }
    // Created with mode 0600 from the start: never readable by others, not even briefly.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key_path)
        .and_then(|mut f| f.write_all(secret.as_bytes()))
        .map_err(|e| anyhow::anyhow!("writing {key_path}: {e}"))?;
    std::fs::write(&pub_path, &public).map_err(|e| anyhow::anyhow!("writing {pub_path}: {e}"))?;
    let key = kiln_host::signing::parse_public(&public)?;
    println!(
        "wrote {key_path} (secret: keep it) and {pub_path} ({})",
        kiln_host::signing::fingerprint(&key)
    );
    Ok(())
}

/// `kiln plugin sign --key <name>.key <file.wasm>`.
fn sign(key: &std::path::Path, file: &std::path::Path) -> anyhow::Result<()> {
    let secret = std::fs::read_to_string(key)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", key.display()))?;
    let bytes =
        std::fs::read(file).map_err(|e| anyhow::anyhow!("reading {}: {e}", file.display()))?;
    let found = kiln_host::plugin_tools::inspect(&bytes)?;
    if let Some(why) = found.refusal() {
        anyhow::bail!("not signing {}: {why}", file.display());
    }
    let signature = kiln_host::signing::sign(&secret, &found.digest)
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", key.display()))?;
    let mut sig_path = file.as_os_str().to_owned();
    sig_path.push(".sig");
    std::fs::write(&sig_path, signature)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", sig_path.to_string_lossy()))?;
    println!("signed {} -> {}", found.digest, sig_path.to_string_lossy());
    Ok(())
}

/// `kiln plugin new <task> <dir>`: the files written, then the next command.
fn new_plugin(
    task: &str,
    dir: &std::path::Path,
    sdk_path: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let made = kiln_host::scaffold::new_plugin(task, dir, sdk_path)?;
    for file in &made.files {
        println!("wrote {}", made.dir.join(file).display());
    }
    println!(
        "{task} plugin crate `{}` (kiln-sdk at {})",
        made.name,
        made.sdk.display()
    );
    println!("next: kiln plugin build {}", made.dir.display());
    Ok(())
}

/// `kiln plugin build <dir>`: `cargo build --target wasm32-wasip2 --release` in the crate, then
/// the component's world and digest (the digest last, for scripts).
fn build(dir: &std::path::Path) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = std::process::Command::new(cargo)
        .args([
            "build",
            "--target",
            "wasm32-wasip2",
            "--release",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| anyhow::anyhow!("running cargo in {}: {e}", dir.display()))?;
    if !output.status.success() {
        anyhow::bail!(
            "cargo build failed in {} (is the target installed? `rustup target add wasm32-wasip2`)",
            dir.display()
        );
    }
    // The cdylib's .wasm among cargo's artifacts (the package's own, the last one built).
    let wasm = String::from_utf8_lossy(&output.stdout)
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .filter(|m| {
            m["target"]["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"))
        })
        .filter_map(|m| {
            m["filenames"].as_array().and_then(|f| {
                f.iter()
                    .filter_map(|f| f.as_str())
                    .find(|f| f.ends_with(".wasm"))
                    .map(PathBuf::from)
            })
        })
        .next()
        .ok_or_else(|| anyhow::anyhow!("cargo built no .wasm: is the crate a `cdylib`?"))?;
    let bytes =
        std::fs::read(&wasm).map_err(|e| anyhow::anyhow!("reading {}: {e}", wasm.display()))?;
    let found = kiln_host::plugin_tools::inspect(&bytes)?;
    println!("built {}", wasm.display());
    println!(
        "world: {} ({} bytes)",
        found.world.as_deref().unwrap_or("(none)"),
        found.size
    );
    if let Some(why) = found.refusal() {
        eprintln!("warning: an admin's `kiln admin plugin allow` will refuse it: {why}");
    }
    println!("{}", found.digest);
    Ok(())
}
