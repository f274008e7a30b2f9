//! An MQTT broker inside the process (rumqttd) for the demo, so it runs with nothing installed.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// The conventional MQTT port, used when it is free so that dashboards find the demo.
pub const MQTT_PORT: u16 = 1883;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no free port on 127.0.0.1 for the embedded broker: {0}")]
    NoPort(std::io::Error),
    #[error("cannot start the embedded broker thread: {0}")]
    Thread(std::io::Error),
}

/// Starts a broker on loopback, on port 1883 if free or else any free port, and returns its
/// address. It runs on its own threads until the process exits.
pub fn start_embedded() -> Result<SocketAddr, BrokerError> {
    let address = free_loopback_address()?;
    let server = ServerSettings {
        name: "demo".into(),
        listen: address,
        tls: None,
        next_connection_delay_ms: 1,
        connections: ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: 256 * 1024,
            max_inflight_count: 200,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 10,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("demo".to_string(), server)])),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    };
    let mut broker = Broker::new(config);
    std::thread::Builder::new()
        .name("embedded-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!("embedded broker stopped: {e}");
            }
        })
        .map_err(BrokerError::Thread)?;
    Ok(address)
}

fn free_loopback_address() -> Result<SocketAddr, BrokerError> {
    // Probing by binding leaves a short window before the broker binds; on loopback that is fine.
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, MQTT_PORT))
        .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .map_err(BrokerError::NoPort)?;
    listener.local_addr().map_err(BrokerError::NoPort)
}
