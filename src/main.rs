//! The `rtgate` command: wiring only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rand::Rng;
use tokio_util::sync::CancellationToken;

use rtgate::auth::Authenticator;
use rtgate::broker::idempotency::{IdempotencyStore, LocalIdempotency};
use rtgate::broker::{
    Broker, ClusterBroker, KafkaBroker, MemoryBroker, ProbeTiming, RedisBroker, Registry,
};
use rtgate::config::{BrokerKind, Config};
use rtgate::gateway::{Gateway, Hub};

/// Exit status for bad configuration or usage.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(name = "rtgate", version, about = "Realtime WebSocket gateway")]
struct Cli {
    /// TOML config file (else $RTGATE_CONFIG; RTGATE_* variables override it).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Serve,
    /// Print an HS256 token signed with the configured secret.
    Token {
        /// User id (`sub`).
        #[arg(long)]
        sub: String,
        /// Mark the user as an admin.
        #[arg(long)]
        admin: bool,
        /// Lifetime, e.g. `1h`, `30m`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Configuration tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (secrets redacted), or name the bad key (exit 2).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve);
    let config = match Config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rtgate: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    match command {
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            print!("{}", config.to_redacted_toml());
            ExitCode::SUCCESS
        }
        Command::Token { sub, admin, ttl } => {
            if config.auth.jwt_secret.is_empty() {
                eprintln!(
                    "rtgate: auth.jwt_secret is not set (config file or RTGATE_AUTH__JWT_SECRET)"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            let auth = match Authenticator::from_config(&config.auth) {
                Ok(a) => a,
                Err(e) => {
                    eprintln!("rtgate: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            if let Some(max) = config.auth.max_token_lifetime
                && ttl > max
            {
                eprintln!(
                    "rtgate: --ttl is longer than auth.max_token_lifetime ({}); the token would be refused",
                    humantime::format_duration(max)
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            println!("{}", auth.issue(&sub, admin, ttl));
            ExitCode::SUCCESS
        }
        Command::Serve => {
            if config.server.demo == Some(true)
                && config.auth.jwt_secret.is_empty()
                && config.auth.has_keys()
            {
                eprintln!(
                    "rtgate: server.demo signs HS256 tokens and needs auth.jwt_secret \
                     (only a public key or JWKS is configured)"
                );
                return ExitCode::from(EXIT_CONFIG);
            }
            run_async(serve(config))
        }
    }
}

fn run_async(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("rtgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rtgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(mut config: Config) -> anyhow::Result<()> {
    if config.server.instance_id.is_empty() {
        config.server.instance_id = format!("rtg-{:08x}", rand::rng().random::<u32>());
    }
    let _telemetry = rtgate::telemetry::init(&config.telemetry, &config.server.instance_id)?;
    // Demo mode hands a token to anyone: on by itself only with the development secret.
    let dev_secret = !config.auth.has_keys();
    let demo = config.server.demo_enabled(&config.auth);
    if demo && !dev_secret {
        tracing::warn!(
            "server.demo = true with configured keys: /api/v1/demo/token signs a token for any \
             user id; never run this in production"
        );
    }
    config.server.demo = Some(demo);
    if dev_secret {
        let bytes: [u8; 24] = rand::rng().random();
        config.auth.jwt_secret = bytes.iter().map(|b| format!("{b:02x}")).collect();
        tracing::warn!(
            "auth.jwt_secret is not set: using an ephemeral secret, for development only"
        );
    }
    let config = Arc::new(config);

    let listener = tokio::net::TcpListener::bind(config.server.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.server.listen))?;
    let local = listener.local_addr()?;
    let admin_listener = match config.server.admin_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (server.admin_listen)"))?,
        ),
        None => None,
    };

    let hub = Arc::new(Hub::new(
        config.server.instance_id.as_str().into(),
        config.broker.kind.as_str(),
    ));
    // The message broker, and the registry of presence and instances beside it.
    let (broker, registry): (Arc<dyn Broker>, Arc<dyn Registry>) = match config.broker.kind {
        BrokerKind::Memory => {
            let memory = Arc::new(
                MemoryBroker::new(hub.clone(), config.broker.history_size).with_idempotency(
                    config.broker.idempotency_window,
                    config.broker.idempotency_max_keys,
                ),
            );
            (memory.clone(), memory)
        }
        BrokerKind::Redis if !config.redis.cluster_nodes.is_empty() => {
            let cluster = Arc::new(ClusterBroker::start(
                config.redis.clone(),
                &config.broker,
                config.heartbeat.ttl,
                hub.instance_id().clone(),
                hub.clone(),
            ));
            (cluster.clone(), cluster)
        }
        BrokerKind::Redis => {
            let redis = Arc::new(RedisBroker::start(
                config.redis.clone(),
                &config.broker,
                config.heartbeat.ttl,
                hub.instance_id().clone(),
                hub.clone(),
            ));
            (redis.clone(), redis)
        }
        BrokerKind::Kafka => {
            // Presence, heartbeats and idempotency keys: Redis when configured, else this
            // process only.
            let (registry, idempotency): (Arc<dyn Registry>, Arc<dyn IdempotencyStore>) =
                if !config.redis.cluster_nodes.is_empty() {
                    let cluster = Arc::new(
                        ClusterBroker::start(
                            config.redis.clone(),
                            &config.broker,
                            config.heartbeat.ttl,
                            hub.instance_id().clone(),
                            hub.clone(),
                        )
                        .presence_only(),
                    );
                    (cluster.clone(), cluster)
                } else if config.redis.is_configured() {
                    let redis = Arc::new(
                        RedisBroker::start(
                            config.redis.clone(),
                            &config.broker,
                            config.heartbeat.ttl,
                            hub.instance_id().clone(),
                            hub.clone(),
                        )
                        .presence_only(),
                    );
                    (redis.clone(), redis)
                } else {
                    (
                        Arc::new(MemoryBroker::new(hub.clone(), 1)),
                        Arc::new(LocalIdempotency::new(config.broker.idempotency_max_keys)),
                    )
                };
            let kafka = KafkaBroker::start(
                config.kafka.clone(),
                hub.instance_id().clone(),
                ProbeTiming {
                    interval: config.broker.probe_interval,
                    timeout: config.broker.probe_timeout,
                },
                hub.clone(),
            )
            .context("cannot create the Kafka clients")?
            .with_idempotency(idempotency, config.broker.idempotency_window);
            (Arc::new(kafka), registry)
        }
    };
    let auth = Authenticator::from_config(&config.auth)?;
    // The first JWKS fetch is awaited (bounded); a failure is logged and does not stop the start.
    let stop = CancellationToken::new();
    let jwks_refresh = auth.start_jwks(stop.clone()).await;
    let gw = Arc::new(Gateway::new(
        config.clone(),
        auth,
        broker,
        registry,
        hub,
        local.to_string(),
    )?);

    // Announce this instance before anyone can ask /api/v1/stats. An unreachable broker does
    // not stop the start: /readyz answers 503 until it is reachable.
    let connecting = std::time::Instant::now();
    while !gw.is_ready() && connecting.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if let Err(e) = gw.heartbeat().await {
        tracing::warn!(error = %e, "first heartbeat failed; retrying in the background");
    }
    // Tools and tests read these lines to find the ports.
    if let Some(admin) = &admin_listener {
        println!(
            "rtgate admin endpoints (metrics, stats) at http://{}",
            admin.local_addr()?
        );
    }
    println!("rtgate {} listening on http://{local}", rtgate::VERSION);
    let connect_host = if local.ip().is_unspecified() {
        format!("127.0.0.1:{}", local.port())
    } else {
        local.to_string()
    };
    if dev_secret {
        let token = gw.auth.issue("dev", true, Duration::from_secs(24 * 3600));
        println!("development token (user \"dev\", admin, 24h): {token}");
        println!("connect: ws://{connect_host}/api/v1/ws?token={token}");
    }
    tracing::info!(instance = %gw.instance_id(), broker = gw.broker.kind(), "started");

    rtgate::telemetry::metric::started();
    // Heartbeats and the sweeper; the occupancy index (rooms listing, occupied/vacated).
    supervise_until_stop("maintenance", &gw, &stop, |gw, stop| {
        gw.run_maintenance(stop)
    });
    supervise_until_stop("occupancy", &gw, &stop, |gw, stop| gw.run_occupancy(stop));
    supervise_until_stop("presence", &gw, &stop, |gw, stop| {
        gw.run_presence_resync(stop)
    });
    let webhooks = tokio::spawn(gw.webhooks.clone().run(
        stop.clone(),
        config.shutdown.grace.min(Duration::from_secs(5)),
    ));
    let drained = CancellationToken::new();
    let shutdown = {
        let gw = gw.clone();
        let drained = drained.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("shutdown signal received");
            gw.drain(gw.config.shutdown.grace).await;
            gw.flush_occupancy(Duration::from_secs(2)).await;
            drained.cancel();
        }
    };
    let header_timeout = config.server.header_read_timeout;
    let admin = match admin_listener {
        Some(listener) => {
            let app = rtgate::http::admin_router(gw.clone());
            let stop = stop.clone();
            Some(tokio::spawn(rtgate::http::serve(
                listener,
                app,
                header_timeout,
                async move { stop.cancelled().await },
            )))
        }
        None => None,
    };
    rtgate::http::serve(
        listener,
        rtgate::http::router(gw.clone()),
        header_timeout,
        shutdown,
    )
    .await;
    drained.cancelled().await;
    stop.cancel();
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    if let Some(task) = jwks_refresh {
        let _ = task.await;
    }
    let _ = webhooks.await;
    tracing::info!("stopped");
    Ok(())
}

/// Runs a task of the gateway under the supervisor: restarted if it ends or panics before
/// `stop`.
fn supervise_until_stop<F, Fut>(
    name: &'static str,
    gw: &Arc<Gateway>,
    stop: &CancellationToken,
    task: F,
) where
    F: Fn(Arc<Gateway>, CancellationToken) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (gw, stop) = (gw.clone(), stop.clone());
    rtgate::supervise::spawn(
        name,
        move || {
            let run = task(gw.clone(), stop.clone());
            let stop = stop.clone();
            async move {
                run.await;
                if stop.is_cancelled() {
                    rtgate::supervise::Exit::Done
                } else {
                    rtgate::supervise::Exit::Failed
                }
            }
        },
        || {},
    );
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
