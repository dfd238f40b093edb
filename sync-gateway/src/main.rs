//! `sync-gateway serve | token`: the command line over the `sync_gateway` library.

use anyhow::Context;
use clap::Parser;
use sync_gateway::config::{Cli, Command};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Token(t) => {
            let claims = t.claims.as_slice();
            let token = sync_gateway::access::auth::mint(
                &t.jwt_secret,
                &t.sub,
                t.role.as_deref(),
                t.ttl,
                t.aud.as_deref(),
                claims,
            );
            println!("{token}");
            Ok(())
        }
        Command::Serve(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(stop_on_signal(shutdown.clone()));
                sync_gateway::serve(*args, shutdown)
                    .await
                    .context("sync-gateway serve")
            })
        }
    }
}

/// Ctrl-C or SIGTERM begins a clean shutdown.
async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("stopping");
    shutdown.cancel();
}
