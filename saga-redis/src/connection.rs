//! The one connection of a store: a multiplexed, auto-reconnecting connection manager to a
//! standalone server, or the cluster client's connection. Both are cheap to clone (handles to
//! one shared connection) and pipeline concurrent requests.

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

/// Which kind of deployment the store talks to.
#[derive(Clone)]
pub(crate) enum Connection {
    /// One server (or a primary behind a proxy).
    Standalone(ConnectionManager),
    /// A Redis Cluster.
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connection::Standalone(_) => f.write_str("Connection::Standalone"),
            Connection::Cluster(_) => f.write_str("Connection::Cluster"),
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Standalone(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Standalone(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

impl Connection {
    /// Sends `cmd` to the node that owns `key`'s slot (standalone: the server). For commands
    /// without keys that must reach one particular primary, such as `WAIT`.
    pub(crate) async fn on_node_of(&mut self, key: &str, cmd: Cmd) -> Result<Value, RedisError> {
        match self {
            Connection::Standalone(c) => cmd.query_async(c).await,
            Connection::Cluster(c) => {
                let route = Route::with_key(key.as_bytes(), SlotAddr::Master);
                c.route_command(
                    cmd,
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                )
                .await
            }
        }
    }

    /// Sends `cmd` to every primary; one reply (or error) per node, named by address.
    pub(crate) async fn on_every_primary(
        &mut self,
        standalone_name: &str,
        cmd: Cmd,
    ) -> Vec<(String, Result<Value, RedisError>)> {
        match self {
            Connection::Standalone(c) => {
                vec![(standalone_name.to_owned(), cmd.query_async(c).await)]
            }
            Connection::Cluster(c) => {
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                match c.route_command(cmd, routing).await {
                    Ok(Value::Map(replies)) => replies
                        .into_iter()
                        .map(|(node, reply)| {
                            let node = match node {
                                Value::BulkString(bytes) => {
                                    String::from_utf8_lossy(&bytes).into_owned()
                                }
                                Value::SimpleString(text) => text,
                                other => format!("{other:?}"),
                            };
                            let reply = match reply {
                                Value::ServerError(err) => Err(RedisError::from(err)),
                                value => Ok(value),
                            };
                            (node, reply)
                        })
                        .collect(),
                    Ok(other) => vec![("cluster".to_owned(), Ok(other))],
                    Err(err) => vec![("cluster".to_owned(), Err(err))],
                }
            }
        }
    }
}
