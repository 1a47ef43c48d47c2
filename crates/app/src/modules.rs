//! The module registry (the Grafana Loki model). A module is a part of the system
//! that can be started; each names the modules it needs. A target is the set of
//! modules one process runs: `all` runs every module. Splitting a service into its
//! own process later is one line in [`Target::modules`] (and one in
//! [`Target::ALL_TARGETS`]).

use std::fmt;
use std::str::FromStr;

/// A startable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Module {
    /// Pools and migrations of the configured database.
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

    /// The modules this one needs running in the same process.
    pub fn dependencies(self) -> &'static [Module] {
        match self {
            Self::Database | Self::Operations => &[],
            Self::Events | Self::Jobs => &[Module::Database],
            Self::Users | Self::Inventory | Self::Payments => &[Module::Database, Module::Events],
            Self::Catalog => &[Module::Database, Module::Events, Module::Inventory],
            Self::Orders => &[
                Module::Database,
                Module::Events,
                Module::Jobs,
                Module::Catalog,
                Module::Inventory,
                Module::Payments,
            ],
            Self::Notifications => &[Module::Database, Module::Events, Module::Jobs],
            Self::Media => &[
                Module::Database,
                Module::Events,
                Module::Jobs,
                Module::Catalog,
            ],
        }
    }
}

/// What one process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Target {
    /// Every module in one process.
    #[default]
    All,
}

impl Target {
    pub const ALL_TARGETS: &'static [Target] = &[Target::All];

    pub fn name(self) -> &'static str {
        match self {
            Self::All => "all",
        }
    }

    /// The modules the target asks for (before dependencies are added).
    fn modules(self) -> &'static [Module] {
        match self {
            Self::All => Module::ALL,
        }
    }

    /// The modules to start, dependencies included, each after what it needs.
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
        let mut out = Vec::new();
        for module in self.modules() {
            visit(*module, &mut out);
        }
        // Operations always run: every process answers health and metrics.
        if !out.contains(&Module::Operations) {
            out.insert(0, Module::Operations);
        }
        out
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL_TARGETS
            .iter()
            .copied()
            .find(|t| t.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL_TARGETS.iter().map(|t| t.name()).collect();
                format!("unknown target {s:?}; known targets: {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_resolves_every_module_after_its_dependencies() {
        let order = Target::All.resolve();
        for module in Module::ALL {
            let at = order.iter().position(|m| m == module).unwrap();
            for dep in module.dependencies() {
                assert!(order.iter().position(|m| m == dep).unwrap() < at);
            }
        }
        assert_eq!(order.len(), Module::ALL.len());
    }

    #[test]
    fn parse_targets() {
        assert_eq!("all".parse::<Target>().unwrap(), Target::All);
        assert!(
            "nope"
                .parse::<Target>()
                .unwrap_err()
                .contains("known targets: all")
        );
    }
}
