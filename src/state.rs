//! The state every connection and background task shares: configuration, the publish
//! pipeline (with the router and storage), the session registry, the memory guard, delayed
//! messages and access control. Built by the wiring (`broker`), read by everything it starts.

use std::sync::Arc;
use std::time::Instant;

use crate::auth::Auth;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::delayed::DelayedMessages;
use crate::overload::MemoryGuard;
use crate::publish::Pipeline;
use crate::router::Router;
use crate::session::SessionRegistry;

#[derive(Debug)]
pub struct BrokerState {
    pub config: Config,
    /// The router, also reachable through `publish`; kept here for the many reads (counts,
    /// subscribe, retained matches) that are not publishes.
    pub router: Arc<Router>,
    /// Routing, durability and delivery of every message.
    pub publish: Pipeline,
    pub sessions: Arc<SessionRegistry>,
    /// This node's membership in a cluster; `None` for a single node.
    pub cluster: Option<Arc<Cluster>>,
    pub started: Instant,
    /// Messages published to `$delayed/...`, waiting to fall due.
    pub delayed: DelayedMessages,
    /// Bytes queued in all mailboxes; publishers pause while it is above its high-water mark.
    pub memory: Arc<MemoryGuard>,
    /// Password file and ACL.
    pub auth: Auth,
}
