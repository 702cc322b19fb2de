//! Version routes: which clients get which schema version of a table changed with
//! `run --expand-contract`. A route matches a startup parameter (`application_name=billing-v1`)
//! and names a schema; a matching client's StartupMessage gets `search_path` set to that schema
//! first, so its code finds the version's views before the tables, without a change to the
//! application. Routes come from `--route` and change at run time through the console
//! (`ROUTE`, `UNROUTE`, `SHOW ROUTES`). A client already connected moves with them at its next
//! transaction boundary ([`SessionRoute`]: the relay sends `SET search_path` upstream before its
//! next request, while it would be held anyway), and so does a client whose `application_name`
//! changes after it connected (the server reports it in a ParameterStatus; pgjdbc sets it that
//! way).
//!
//! Invariant: a client that sets `search_path` itself at connect (as a startup parameter or in
//! `options`) keeps it and is never moved; a client no route matches gets its StartupMessage
//! forwarded byte for byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use bytes::{Bytes, BytesMut};

use crate::sql::quote_ident;

/// `param=value:schema`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionRoute {
    pub param: String,
    pub value: String,
    pub schema: String,
}

impl std::str::FromStr for VersionRoute {
    type Err = String;

    /// `application_name=billing-v1:app_v1`.
    fn from_str(s: &str) -> Result<VersionRoute, String> {
        let bad = || {
            format!("route {s:?}: expected PARAMETER=VALUE:SCHEMA, e.g. application_name=billing-v1:app_v1")
        };
        let (matcher, schema) = s.rsplit_once(':').ok_or_else(bad)?;
        let (param, value) = matcher.split_once('=').ok_or_else(bad)?;
        let (param, value, schema) = (param.trim(), value.trim(), schema.trim());
        if param.is_empty() || schema.is_empty() {
            return Err(bad());
        }
        Ok(VersionRoute {
            param: param.to_string(),
            value: value.to_string(),
            schema: schema.to_string(),
        })
    }
}

impl std::fmt::Display for VersionRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}:{}", self.param, self.value, self.schema)
    }
}

/// The proxy's routes, first match wins.
#[derive(Debug, Default)]
pub struct Routes {
    list: Mutex<Vec<VersionRoute>>,
    /// Bumped by every change, so sessions notice it with one atomic load.
    generation: AtomicU64,
}

impl Routes {
    pub fn new(list: Vec<VersionRoute>) -> Routes {
        Routes {
            list: Mutex::new(list),
            generation: AtomicU64::new(0),
        }
    }

    /// Changes so far (never `u64::MAX`, which [`SessionRoute`] uses for "check again").
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<VersionRoute>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a route, replacing one for the same parameter and value.
    pub fn set(&self, route: VersionRoute) {
        let mut l = self.lock();
        l.retain(|r| !(r.param == route.param && r.value == route.value));
        l.push(route);
        self.changed();
    }

    /// Remove the route for this parameter and value; whether there was one.
    pub fn remove(&self, param: &str, value: &str) -> bool {
        let mut l = self.lock();
        let before = l.len();
        l.retain(|r| !(r.param == param && r.value == value));
        let removed = l.len() != before;
        if removed {
            self.changed();
        }
        removed
    }

    pub fn snapshot(&self) -> Vec<VersionRoute> {
        self.lock().clone()
    }

    /// The schema for a client with these startup parameters.
    pub fn version_for(&self, params: &[(String, String)]) -> Option<String> {
        self.lock()
            .iter()
            .find(|r| params.iter().any(|(k, v)| *k == r.param && *v == r.value))
            .map(|r| r.schema.clone())
    }
}

/// Where one session stands with the routes: what it matches, the version it is on, and the
/// routes' generation it was last checked against.
#[derive(Debug)]
pub struct SessionRoute {
    /// The startup parameters, with `application_name` as the server last reported it.
    params: Vec<(String, String)>,
    /// The client chose its own search_path at connect: it is never moved.
    own: bool,
    /// Its StartupMessage carried a routed search_path (so `RESET` would return to that).
    startup_routed: bool,
    version: Option<String>,
}

/// A move of one session to another version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Move {
    /// The statement that makes it (a simple Query's text).
    pub sql: String,
    pub to: Option<String>,
}

impl SessionRoute {
    /// A session that connected with `params` and was put on `version` at startup.
    pub fn new(params: Vec<(String, String)>, version: Option<String>) -> SessionRoute {
        let own = chose_own_path(&params);
        SessionRoute {
            params,
            own,
            startup_routed: version.is_some(),
            version,
        }
    }

    pub fn version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The server reported a new `application_name`.
    pub fn set_application_name(&mut self, value: &str) {
        match self
            .params
            .iter_mut()
            .find(|(k, _)| k == "application_name")
        {
            Some((_, v)) => *v = value.to_string(),
            None => self
                .params
                .push(("application_name".into(), value.to_string())),
        }
    }

    /// The move `routes` ask of this session now, if any.
    pub fn due(&self, routes: &Routes) -> Option<Move> {
        if self.own {
            return None;
        }
        let to = routes.version_for(&self.params);
        if to == self.version {
            return None;
        }
        let sql = match &to {
            Some(v) => format!("SET search_path = {}", version_path(v)),
            // back to what it connected with: the server's default, or (routed at connect,
            // where RESET would return to the route) PostgreSQL's default
            None if self.startup_routed => "SET search_path = \"$user\", public".to_string(),
            None => "RESET search_path".to_string(),
        };
        Some(Move { sql, to })
    }

    /// The move was sent.
    pub fn moved(&mut self, m: Move) {
        self.version = m.to;
    }
}

/// A client that names its own search_path at connect.
fn chose_own_path(params: &[(String, String)]) -> bool {
    params
        .iter()
        .any(|(k, v)| k == "search_path" || (k == "options" && v.contains("search_path")))
}

/// `"schema", "$user", public`: the version first, then PostgreSQL's default path.
fn version_path(schema: &str) -> String {
    format!("{}, \"$user\", public", quote_ident(schema))
}

/// The StartupMessage to send upstream for a client routed to `schema`: its parameters with
/// `search_path` = the version first, then PostgreSQL's default path. None when the client chose
/// its own search_path (it keeps it).
pub fn routed_startup(version: i32, params: &[(String, String)], schema: &str) -> Option<Bytes> {
    if chose_own_path(params) {
        return None;
    }
    let path = version_path(schema);
    let mut body = BytesMut::new();
    body.extend_from_slice(&version.to_be_bytes());
    for (k, v) in params
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .chain([("search_path", path.as_str())])
    {
        body.extend_from_slice(k.as_bytes());
        body.extend_from_slice(&[0]);
        body.extend_from_slice(v.as_bytes());
        body.extend_from_slice(&[0]);
    }
    body.extend_from_slice(&[0]);
    let mut out = BytesMut::with_capacity(body.len() + 4);
    let len = i32::try_from(body.len() + 4).ok()?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::startup::StartupPacket;

    fn params(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn routes_parse_and_print_and_refuse_what_is_not_a_route() {
        let r: VersionRoute = "application_name=billing-v1:app_v1"
            .parse()
            .expect("a route");
        assert_eq!(
            (r.param.as_str(), r.value.as_str(), r.schema.as_str()),
            ("application_name", "billing-v1", "app_v1")
        );
        assert_eq!(r.to_string(), "application_name=billing-v1:app_v1");
        for bad in ["app_v1", "application_name=x", "=x:y", "a=b:"] {
            assert!(bad.parse::<VersionRoute>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_first_matching_route_wins_and_a_route_can_be_replaced_or_removed() {
        let routes = Routes::new(vec![
            "application_name=old:v1".parse().expect("route"),
            "user=batch:v2".parse().expect("route"),
        ]);
        let client = params(&[("user", "batch"), ("application_name", "old")]);
        assert_eq!(routes.version_for(&client).as_deref(), Some("v1"));
        assert_eq!(routes.version_for(&params(&[("user", "web")])), None);
        routes.set("application_name=old:v3".parse().expect("route"));
        assert_eq!(
            routes.version_for(&client).as_deref(),
            Some("v2"),
            "v3 comes after v2 now"
        );
        assert!(routes.remove("user", "batch"));
        assert!(!routes.remove("user", "batch"));
        assert_eq!(routes.version_for(&client).as_deref(), Some("v3"));
    }

    #[test]
    fn a_routed_startup_sets_search_path_unless_the_client_chose_one() {
        let p = params(&[
            ("user", "u"),
            ("database", "d"),
            ("application_name", "old"),
        ]);
        let raw = routed_startup(196608, &p, "People V1").expect("routed");
        let parsed = StartupPacket::parse(&raw).expect("a valid StartupMessage");
        let StartupPacket::Startup { version, params } = parsed else {
            panic!("not a startup message: {parsed:?}");
        };
        assert_eq!(version, 196608);
        assert_eq!(&params[..3], &p[..]);
        assert_eq!(
            params[3],
            (
                "search_path".to_string(),
                "\"People V1\", \"$user\", public".to_string()
            )
        );
        let own = params_with(&p, ("search_path", "mine"));
        assert_eq!(routed_startup(196608, &own, "v1"), None);
        let own = params_with(&p, ("options", "-c search_path=mine"));
        assert_eq!(routed_startup(196608, &own, "v1"), None);
    }

    #[test]
    fn a_connected_session_moves_with_the_routes_and_its_application_name() {
        let routes = Routes::default();
        let g0 = routes.generation();
        let mut s = SessionRoute::new(params(&[("user", "u")]), None);
        assert_eq!(s.due(&routes), None, "no route, nowhere to go");
        routes.set("application_name=billing-v1:app_v1".parse().expect("route"));
        assert_ne!(
            routes.generation(),
            g0,
            "a change is noticed by its generation"
        );
        assert_eq!(s.due(&routes), None, "not matched yet");
        // pgjdbc: SET application_name after logging in
        s.set_application_name("billing-v1");
        let m = s.due(&routes).expect("a move");
        assert_eq!(m.sql, "SET search_path = \"app_v1\", \"$user\", public");
        s.moved(m);
        assert_eq!(s.version(), Some("app_v1"));
        assert_eq!(s.due(&routes), None, "moved once");
        // unrouted: back to the server's default search_path
        assert!(routes.remove("application_name", "billing-v1"));
        let m = s.due(&routes).expect("a move back");
        assert_eq!(m.sql, "RESET search_path");
        s.moved(m);
        assert_eq!(s.version(), None);

        // routed at connect: RESET would return to the route, so the default is spelled out
        routes.set("application_name=billing-v1:app_v1".parse().expect("route"));
        let mut at_connect = SessionRoute::new(
            params(&[("application_name", "billing-v1")]),
            Some("app_v1".into()),
        );
        assert_eq!(at_connect.due(&routes), None);
        routes.set("application_name=billing-v1:app_v2".parse().expect("route"));
        let m = at_connect.due(&routes).expect("to v2");
        assert_eq!(m.to.as_deref(), Some("app_v2"));
        at_connect.moved(m);
        assert!(routes.remove("application_name", "billing-v1"));
        assert_eq!(
            at_connect.due(&routes).map(|m| m.sql),
            Some("SET search_path = \"$user\", public".to_string())
        );

        // a client that chose its own search_path is never moved
        let own = SessionRoute::new(
            params(&[("application_name", "billing-v1"), ("search_path", "mine")]),
            None,
        );
        routes.set("application_name=billing-v1:app_v1".parse().expect("route"));
        assert_eq!(own.due(&routes), None);
    }

    fn params_with(p: &[(String, String)], extra: (&str, &str)) -> Vec<(String, String)> {
        let mut v = p.to_vec();
        v.push((extra.0.to_string(), extra.1.to_string()));
        v
    }
}
