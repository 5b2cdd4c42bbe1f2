//! `kiln`: the server binary. Parses the configuration, sets up logging, runs.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kiln_host::config::{Config, ServeArgs};

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Kiln inference server",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Server configuration file (TOML); flags and environment variables override it.
    #[arg(long, env = "KILN_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// `kiln` alone serves, with these options.
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
}

fn main() -> anyhow::Result<()> {
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
            if let Err(e) = kiln_host::cli::run(&config, admin) {
                // A message to act on, not a backtrace.
                eprintln!("error: {e:#}");
                std::process::exit(2);
            }
            return Ok(());
        }
        None => cli.serve,
    };
    // Configuration errors surface here, before any model loads or port is bound.
    let config = Config::load(cli.config.as_deref(), &args)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(kiln_host::run(config))
}
