//! Modules and targets (the Grafana Loki model). A module is a part of the system
//! that can be started: a platform part (database, operations, event log, job
//! queue) or a service. A target is the set of services one process runs: `all`,
//! one service (`orders`), or a comma list (`orders,notifications`); the platform
//! parts a service needs come with it, and operations run in every process. What
//! each service starts, and which other services it calls, is its registration
//! in [`crate::registry`].

use std::fmt;
use std::str::FromStr;

/// A service: the unit a target names and a process can run on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Users,
    Inventory,
    Catalog,
    Payments,
    Orders,
    Notifications,
    Media,
}

impl Service {
    /// Every service, in start order (a service after those it calls in-process).
    pub const ALL: [Service; 7] = [
        Service::Users,
        Service::Inventory,
        Service::Catalog,
        Service::Payments,
        Service::Orders,
        Service::Notifications,
        Service::Media,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Users => "users",
            Self::Inventory => "inventory",
            Self::Catalog => "catalog",
            Self::Payments => "payments",
            Self::Orders => "orders",
            Self::Notifications => "notifications",
            Self::Media => "media",
        }
    }

    /// The configuration key of the service's address when another process runs it.
    pub fn url_key(self) -> &'static str {
        match self {
            Self::Users => "service_url_users",
            Self::Inventory => "service_url_inventory",
            Self::Catalog => "service_url_catalog",
            Self::Payments => "service_url_payments",
            Self::Orders => "service_url_orders",
            Self::Notifications => "service_url_notifications",
            Self::Media => "service_url_media",
        }
    }

    /// The environment variable of [`Service::url_key`].
    pub fn url_env(self) -> String {
        format!("SCALESHOP_{}", self.url_key().to_ascii_uppercase())
    }

    pub fn module(self) -> Module {
        match self {
            Self::Users => Module::Users,
            Self::Inventory => Module::Inventory,
            Self::Catalog => Module::Catalog,
            Self::Payments => Module::Payments,
            Self::Orders => Module::Orders,
            Self::Notifications => Module::Notifications,
            Self::Media => Module::Media,
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A startable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// Pools and migrations of the configured database (and the signing keys).
    Database,
    /// `/healthz`, `/readyz`, `/metrics`, `/openapi.json`, `/docs`.
    Operations,
    /// The event log (outbox), its dispatcher and admin routes.
    Events,
    /// The job queue's workers and admin routes.
    Jobs,
    /// The users service.
    Users,
    /// The inventory service.
    Inventory,
    /// The catalog service.
    Catalog,
    /// Payments: the sandbox gateway and its ledger.
    Payments,
    /// The order service and the order processor (saga).
    Orders,
    /// The notification service (welcome and order emails).
    Notifications,
    /// The images (media) service: uploads, fetches, the `images` jobs, variants.
    Media,
}

impl Module {
    pub const ALL: &'static [Module] = &[
        Module::Database,
        Module::Operations,
        Module::Events,
        Module::Jobs,
        Module::Users,
        Module::Inventory,
        Module::Catalog,
        Module::Payments,
        Module::Orders,
        Module::Notifications,
        Module::Media,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Database => "database",
            Self::Operations => "operations",
            Self::Events => "events",
            Self::Jobs => "jobs",
            Self::Users => "users",
            Self::Inventory => "inventory",
            Self::Catalog => "catalog",
            Self::Payments => "payments",
            Self::Orders => "orders",
            Self::Notifications => "notifications",
            Self::Media => "media",
        }
    }

    /// The platform modules this one needs in the same process. (Which services a
    /// service calls, in-process or over HTTP, is its registration's business.)
    pub fn dependencies(self) -> &'static [Module] {
        match self {
            Self::Database | Self::Operations => &[],
            Self::Events | Self::Jobs => &[Module::Database],
            Self::Users | Self::Inventory | Self::Catalog | Self::Payments => {
                &[Module::Database, Module::Events]
            }
            Self::Orders | Self::Notifications | Self::Media => {
                &[Module::Database, Module::Events, Module::Jobs]
            }
        }
    }
}

/// What one process runs: a non-empty set of services.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Target(u8);

impl Default for Target {
    fn default() -> Self {
        Self::ALL
    }
}

impl Target {
    /// Every service in one process.
    pub const ALL: Target = Target((1 << Service::ALL.len()) - 1);

    /// One service.
    pub fn only(service: Service) -> Self {
        Self(service.bit())
    }

    pub fn contains(self, service: Service) -> bool {
        self.0 & service.bit() != 0
    }

    pub fn is_all(self) -> bool {
        self == Self::ALL
    }

    /// The services of the target, in start order.
    pub fn services(self) -> impl Iterator<Item = Service> {
        Service::ALL.into_iter().filter(move |s| self.contains(*s))
    }

    /// The names a target can be made of.
    pub fn known_names() -> String {
        let mut names = vec!["all"];
        names.extend(Service::ALL.iter().map(|s| s.name()));
        names.join(", ")
    }

    /// The modules to start, platform parts included, each after what it needs;
    /// operations always run (every process answers health and metrics).
    pub fn resolve(self) -> Vec<Module> {
        fn visit(module: Module, out: &mut Vec<Module>) {
            if out.contains(&module) {
                return;
            }
            for dependency in module.dependencies() {
                visit(*dependency, out);
            }
            out.push(module);
        }
        let mut out = vec![Module::Operations];
        visit(Module::Database, &mut out);
        for service in self.services() {
            visit(service.module(), &mut out);
        }
        out
    }
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Target({self})")
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_all() {
            return f.write_str("all");
        }
        let names: Vec<_> = self.services().map(Service::name).collect();
        f.write_str(&names.join(","))
    }
}

impl FromStr for Target {
    type Err = String;

    /// `all`, a service name, or a comma list of them (spaces around names are
    /// ignored; a repeated name counts once).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut bits = 0u8;
        for name in s.split(',').map(str::trim) {
            if name == "all" {
                bits |= Self::ALL.0;
                continue;
            }
            let service = Service::ALL
                .iter()
                .find(|service| service.name() == name)
                .ok_or_else(|| {
                    format!(
                        "unknown target {name:?}; known targets: {} (or a comma list of them)",
                        Self::known_names()
                    )
                })?;
            bits |= service.bit();
        }
        Ok(Self(bits))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_resolves_every_module_after_its_dependencies() {
        let order = Target::ALL.resolve();
        for module in Module::ALL {
            let at = order.iter().position(|m| m == module).unwrap();
            for dep in module.dependencies() {
                assert!(order.iter().position(|m| m == dep).unwrap() < at);
            }
        }
        assert_eq!(order.len(), Module::ALL.len());
    }

    #[test]
    fn a_service_target_resolves_its_platform_parts_only() {
        let order = "users".parse::<Target>().unwrap().resolve();
        assert_eq!(
            order,
            [
                Module::Operations,
                Module::Database,
                Module::Events,
                Module::Users
            ]
        );
        let order = "orders,notifications".parse::<Target>().unwrap().resolve();
        assert_eq!(
            order,
            [
                Module::Operations,
                Module::Database,
                Module::Events,
                Module::Jobs,
                Module::Orders,
                Module::Notifications
            ]
        );
    }

    #[test]
    fn parse_targets() {
        assert_eq!("all".parse::<Target>().unwrap(), Target::ALL);
        assert_eq!("all".parse::<Target>().unwrap().to_string(), "all");
        let users = "users".parse::<Target>().unwrap();
        assert_eq!(users, Target::only(Service::Users));
        assert!(users.contains(Service::Users) && !users.contains(Service::Orders));
        let pair = " orders , notifications,orders".parse::<Target>().unwrap();
        assert_eq!(
            pair.services().collect::<Vec<_>>(),
            [Service::Orders, Service::Notifications]
        );
        assert_eq!(pair.to_string(), "orders,notifications");
        let every: String = Service::ALL.map(Service::name).join(",");
        assert_eq!(every.parse::<Target>().unwrap(), Target::ALL);
        for service in Service::ALL {
            let parsed: Target = service.name().parse().unwrap();
            assert_eq!(parsed.services().collect::<Vec<_>>(), [service]);
        }
        for bad in ["nope", "users,nope", "", "users,", "All"] {
            let err = bad.parse::<Target>().unwrap_err();
            assert!(
                err.contains(
                    "known targets: all, users, inventory, catalog, payments, orders, notifications, media"
                ),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn url_keys_name_the_service() {
        assert_eq!(Service::Catalog.url_key(), "service_url_catalog");
        assert_eq!(Service::Catalog.url_env(), "SCALESHOP_SERVICE_URL_CATALOG");
    }
}
