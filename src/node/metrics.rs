//! The node's one Prometheus endpoint: every served layer's series (labels `layer`, `device`,
//! `index_digest`) plus node totals, through prometheus-client.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use super::daemon::Node;
use super::events::kind;
use crate::fetch::metrics::encode_layers;

struct NodeCollector(Node);

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let node = &self.0;
        let layers: Vec<_> = node
            .layer_metrics()
            .into_iter()
            .map(|(device, layer, digest, m)| {
                (
                    vec![
                        ("layer", layer),
                        ("device", device),
                        ("index_digest", digest),
                    ],
                    m,
                )
            })
            .collect();
        encode_layers(&mut encoder, &layers)?;
        let gauges: [(&str, &str, i64); 6] = [
            (
                "lazyblk_node_layers",
                "Layers served by this node daemon.",
                layers.len() as i64,
            ),
            (
                "lazyblk_node_layers_pending",
                "Devices waiting to be resumed (see lazyblk ls).",
                node.pending_count() as i64,
            ),
            (
                "lazyblk_node_memory_cache_bytes",
                "Decoded chunk bytes held in the node's memory cache.",
                node.memory().bytes() as i64,
            ),
            (
                "lazyblk_node_memory_budget_bytes",
                "The node's memory budget for decoded chunks.",
                node.memory().capacity() as i64,
            ),
            (
                "lazyblk_node_disk_cache_bytes",
                "Bytes in the node's chunk cache on disk.",
                node.disk().map(|d| d.total_bytes()).unwrap_or(0) as i64,
            ),
            (
                "lazyblk_node_registry_sessions",
                "Registry sessions (one per repository) open.",
                node.sessions() as i64,
            ),
        ];
        for (name, help, v) in gauges {
            let f = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(v).encode(f)?;
        }
        let f = encoder.encode_descriptor(
            "lazyblk_node_read_errors",
            "Failed reads on this node (each is also an event).",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(node.events().count(kind::READ_ERROR) as u64).encode(f)?;
        Ok(())
    }
}

/// The registry of a node (its collector reads the node at each scrape).
pub fn registry(node: &Node) -> Arc<Registry> {
    let mut r = Registry::default();
    r.register_collector(Box::new(NodeCollector(node.clone())));
    Arc::new(r)
}

/// Serves `GET /metrics` for `node` on `listener`.
pub async fn serve(node: Node, listener: tokio::net::TcpListener) {
    let reg = registry(&node);
    crate::fetch::metrics::serve_http(
        listener,
        Arc::new(move || crate::fetch::metrics::render(&reg)),
    )
    .await
}
