//! Version routes: which clients get which schema version of a table changed with
//! `run --expand-contract`. A route matches a startup parameter (`application_name=billing-v1`)
//! and names a schema; a matching client's StartupMessage gets `search_path` set to that schema
//! first, so its code finds the version's views before the tables, without a change to the
//! application. Routes come from `--route` and change at run time through the console
//! (`ROUTE`, `UNROUTE`, `SHOW ROUTES`); a change applies to connections made after it.
//!
//! Invariant: a client that sets `search_path` itself (as a startup parameter or in `options`)
//! keeps it; a client no route matches gets its StartupMessage forwarded byte for byte.

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
}

impl Routes {
    pub fn new(list: Vec<VersionRoute>) -> Routes {
        Routes {
            list: Mutex::new(list),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<VersionRoute>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Add a route, replacing one for the same parameter and value.
    pub fn set(&self, route: VersionRoute) {
        let mut l = self.lock();
        l.retain(|r| !(r.param == route.param && r.value == route.value));
        l.push(route);
    }

    /// Remove the route for this parameter and value; whether there was one.
    pub fn remove(&self, param: &str, value: &str) -> bool {
        let mut l = self.lock();
        let before = l.len();
        l.retain(|r| !(r.param == param && r.value == value));
        l.len() != before
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

/// The StartupMessage to send upstream for a client routed to `schema`: its parameters with
/// `search_path` = the version first, then PostgreSQL's default path. None when the client chose
/// its own search_path (it keeps it).
pub fn routed_startup(version: i32, params: &[(String, String)], schema: &str) -> Option<Bytes> {
    let own = params
        .iter()
        .any(|(k, v)| k == "search_path" || (k == "options" && v.contains("search_path")));
    if own {
        return None;
    }
    let path = format!("{}, \"$user\", public", quote_ident(schema));
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

    fn params_with(p: &[(String, String)], extra: (&str, &str)) -> Vec<(String, String)> {
        let mut v = p.to_vec();
        v.push((extra.0.to_string(), extra.1.to_string()));
        v
    }
}
