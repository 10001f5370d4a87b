//! Connections and topology: one `redis.url`, or the master and replicas found through
//! Sentinel.

use super::*;

/// Connections to one master.
pub(super) struct Connected {
    pub(super) master: MultiplexedConnection,
    pub(super) sink: PubSubSink,
    pub(super) stream: redis::aio::PubSubStream,
    /// `+switch-master` notices from a sentinel, when Sentinel is used.
    pub(super) switch: Option<redis::aio::PubSubStream>,
}

pub(super) fn client_config(cfg: &RedisConfig) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(cfg.command_timeout))
        .set_response_timeout(Some(cfg.command_timeout))
}

/// Replicas each publish waits for: as configured, else 1 once Sentinel has named replicas,
/// kept through failovers. During one, Sentinel can name none for a moment (the master being
/// demoted has just lost its replica to the promotion); taking writes without `WAIT` then let
/// the switch erase acked messages (seen: 8), so a master without a replica refuses publishes
/// instead, as on a Cluster.
fn replicas_to_wait_for(configured: Option<u32>, named: usize, saw_replicas: &AtomicBool) -> u32 {
    if named > 0 {
        saw_replicas.store(true, Ordering::Relaxed);
    }
    match configured {
        Some(n) => n,
        None if saw_replicas.load(Ordering::Relaxed) => 1,
        None => 0,
    }
}

pub(super) async fn connect(shared: &Shared) -> Result<Connected, RedisError> {
    let cfg = &shared.cfg;
    let timeout = cfg.command_timeout;
    let (client, replicas, sentinel_client) = if cfg.sentinels.is_empty() {
        (open_url(cfg)?, Vec::new(), None)
    } else {
        discover(cfg).await?
    };
    let master = client
        .get_multiplexed_async_connection_with_config(&client_config(cfg))
        .await?;
    let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
        .await
        .map_err(|_| io_timeout("Pub/Sub connect"))??;
    let (sink, stream) = pubsub.split();

    let acks = replicas_to_wait_for(cfg.min_replicas_ack, replicas.len(), &shared.saw_replicas);
    shared.min_acks.store(acks, Ordering::Relaxed);
    let mut replica = None;
    if cfg.read_from_replicas {
        for r in &replicas {
            if let Ok(Ok(c)) = tokio::time::timeout(
                timeout,
                r.get_multiplexed_async_connection_with_config(&client_config(cfg)),
            )
            .await
            {
                replica = Some(c);
                break;
            }
        }
    }
    let switch = match sentinel_client {
        Some(s) => match tokio::time::timeout(timeout, s.get_async_pubsub()).await {
            Ok(Ok(mut ps)) => match ps.subscribe("+switch-master").await {
                Ok(()) => Some(ps.into_on_message()),
                Err(_) => None,
            },
            _ => None,
        },
        None => None,
    };
    *shared.master.write() = Some(master.clone());
    *shared.replica.write() = replica;
    tracing::info!(
        master = %client.get_connection_info().addr(),
        replicas = replicas.len(),
        min_replicas_ack = acks,
        "connected to Redis"
    );
    Ok(Connected {
        master,
        sink,
        stream,
        switch,
    })
}

/// The client for `redis.url`, trusting `redis.tls_ca_file` when it is set.
pub(super) fn open_url(cfg: &RedisConfig) -> Result<Client, RedisError> {
    match tls_certificates(cfg)? {
        Some(certs) => Client::build_with_tls(cfg.url.as_str(), certs),
        None => Client::open(cfg.url.as_str()),
    }
}

/// `redis.tls_ca_file` as the only trusted root, when it is set.
pub(super) fn tls_certificates(
    cfg: &RedisConfig,
) -> Result<Option<redis::TlsCertificates>, RedisError> {
    if cfg.tls_ca_file.is_empty() {
        return Ok(None);
    }
    Ok(Some(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(std::fs::read(&cfg.tls_ca_file)?),
    }))
}

/// `rediss` when `redis.tls` asks for TLS to the nodes, else `redis`.
pub(super) fn node_scheme(cfg: &RedisConfig) -> &'static str {
    if cfg.tls { "rediss" } else { "redis" }
}

pub(super) fn io_timeout(what: &str) -> RedisError {
    RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what} timed out"),
    ))
}

/// Asks the sentinels for the master (and replicas). Returns the master client, the replica
/// clients and a client for one reachable sentinel (for `+switch-master`).
pub(super) async fn discover(
    cfg: &RedisConfig,
) -> Result<(Client, Vec<Client>, Option<Client>), RedisError> {
    let auth = if cfg.sentinel_password.is_empty() {
        String::new()
    } else {
        format!(":{}@", urlencode(&cfg.sentinel_password))
    };
    let urls: Vec<String> = cfg
        .sentinels
        .iter()
        .map(|s| format!("{}://{auth}{s}", node_scheme(cfg)))
        .collect();
    let mut sentinel = redis::sentinel::Sentinel::build(urls.clone())?;
    let mut node = redis::RedisConnectionInfo::default().set_db(cfg.db);
    if !cfg.password.is_empty() {
        node = node.set_password(&cfg.password);
    }
    let mut node =
        redis::sentinel::SentinelNodeConnectionInfo::default().set_redis_connection_info(node);
    if cfg.tls {
        node = node.set_tls_mode(redis::TlsMode::Secure);
    }
    let timeout = cfg.command_timeout * 3;
    let master = tokio::time::timeout(
        timeout,
        sentinel.async_master_for(&cfg.master_name, Some(&node)),
    )
    .await
    .map_err(|_| io_timeout("Sentinel master lookup"))??;
    let replicas = tokio::time::timeout(
        timeout,
        sentinel.async_get_replica_clients(&cfg.master_name, Some(&node)),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default();
    let sentinel_client = urls.first().and_then(|u| Client::open(u.as_str()).ok());
    Ok((master, replicas, sentinel_client))
}

pub(super) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_replicas_were_named_publishes_keep_waiting_for_one() {
        let saw = AtomicBool::new(false);
        assert_eq!(replicas_to_wait_for(None, 0, &saw), 0, "a lone Redis");
        assert_eq!(replicas_to_wait_for(None, 2, &saw), 1);
        assert_eq!(
            replicas_to_wait_for(None, 0, &saw),
            1,
            "none named mid-failover"
        );
        assert_eq!(replicas_to_wait_for(Some(0), 0, &saw), 0, "as configured");
        assert_eq!(replicas_to_wait_for(Some(2), 1, &saw), 2);
    }
}
