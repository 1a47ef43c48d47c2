//! Scenarios: what one arrival does. The built-in flows (`health`, `browse`,
//! `buy`, `signup`, `rename`) and mixes of them, named (`mixed`) or read from a TOML file.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

/// One arrival's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    /// `GET /healthz`: the cheapest request, for checking the generator itself.
    Health,
    /// A product page (`GET /v1/products/{id}`) or, `search_percent` of the
    /// time, a search (`GET /v1/products?q=`).
    Browse,
    /// A signed-in shopper views a product, orders it (`POST /v1/orders` with an
    /// `Idempotency-Key`) and polls the order until it is final.
    Buy,
    /// A new account (`POST /v1/users`): one password hash on the server.
    Signup,
    /// A signed-in account renames itself (`PATCH /v1/users/{id}`): a user
    /// write with its event and no password hash, on the user's shard.
    Rename,
}

impl Flow {
    pub const ALL: [Flow; 5] = [
        Flow::Health,
        Flow::Browse,
        Flow::Buy,
        Flow::Signup,
        Flow::Rename,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Flow::Health => "health",
            Flow::Browse => "browse",
            Flow::Buy => "buy",
            Flow::Signup => "signup",
            Flow::Rename => "rename",
        }
    }
}

/// Settings of the flows that a mix file may change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowSettings {
    /// Share of browse arrivals that search instead of reading one product (0..=100).
    pub search_percent: u32,
    /// Payment methods of the orders, used in turn (sandbox test tokens).
    pub payment_methods: Vec<String>,
    /// Units of the one product line of each order.
    pub quantity: u32,
}

impl Default for FlowSettings {
    fn default() -> Self {
        Self {
            search_percent: 20,
            payment_methods: vec!["pm_card_visa".to_owned()],
            quantity: 1,
        }
    }
}

/// What each arrival runs: flows with integer weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub weights: Vec<(Flow, u32)>,
    pub settings: FlowSettings,
}

/// The file form of a user-defined mix.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MixFile {
    name: Option<String>,
    weights: std::collections::BTreeMap<Flow, u32>,
    #[serde(default)]
    settings: FlowSettings,
}

impl Scenario {
    fn single(flow: Flow) -> Self {
        Self {
            name: flow.name().to_owned(),
            weights: vec![(flow, 1)],
            settings: FlowSettings::default(),
        }
    }

    /// `health`, `browse`, `buy`, `signup`, `rename`, `mixed` (browse 80, buy 15,
    /// signup 5), or the path of a TOML mix file.
    pub fn parse(spec: &str) -> Result<Self, Error> {
        let scenario = match spec {
            "health" => Self::single(Flow::Health),
            "browse" => Self::single(Flow::Browse),
            "buy" => Self::single(Flow::Buy),
            "signup" => Self::single(Flow::Signup),
            "rename" => Self::single(Flow::Rename),
            "mixed" => Self {
                name: "mixed".to_owned(),
                weights: vec![(Flow::Browse, 80), (Flow::Buy, 15), (Flow::Signup, 5)],
                settings: FlowSettings::default(),
            },
            path if path.ends_with(".toml") || Path::new(path).is_file() => {
                Self::from_file(Path::new(path))?
            }
            other => {
                return Err(Error::Usage(format!(
                    "unknown scenario `{other}`: expected health, browse, buy, signup, rename, mixed or a .toml mix file"
                )));
            }
        };
        scenario.check()?;
        Ok(scenario)
    }

    fn from_file(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::Usage(format!("cannot read the mix file {}: {e}", path.display()))
        })?;
        Self::from_toml(&text, path)
    }

    /// A mix from its TOML text: `[weights]` (flow = weight) and optional `[settings]`.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, Error> {
        let file: MixFile = toml::from_str(text).map_err(|e| {
            Error::Usage(format!(
                "the mix file {} is not valid: {e}",
                origin.display()
            ))
        })?;
        let name = file.name.unwrap_or_else(|| {
            origin
                .file_stem()
                .map_or_else(|| "mix".to_owned(), |s| s.to_string_lossy().into_owned())
        });
        Ok(Self {
            name,
            weights: file.weights.into_iter().filter(|(_, w)| *w > 0).collect(),
            settings: file.settings,
        })
    }

    fn check(&self) -> Result<(), Error> {
        if self.weights.is_empty() {
            return Err(Error::Usage(
                "a mix needs at least one flow with a weight above 0".to_owned(),
            ));
        }
        if self.weights.iter().map(|(_, w)| u64::from(*w)).sum::<u64>() > 100_000 {
            return Err(Error::Usage(
                "the weights of a mix must add up to at most 100000".to_owned(),
            ));
        }
        if self.settings.search_percent > 100 {
            return Err(Error::Usage(
                "settings.search_percent must be between 0 and 100".to_owned(),
            ));
        }
        if self.settings.payment_methods.is_empty() {
            return Err(Error::Usage(
                "settings.payment_methods must name at least one method".to_owned(),
            ));
        }
        if !(1..=1000).contains(&self.settings.quantity) {
            return Err(Error::Usage(
                "settings.quantity must be between 1 and 1000".to_owned(),
            ));
        }
        Ok(())
    }

    pub fn uses(&self, flow: Flow) -> bool {
        self.weights.iter().any(|(f, _)| *f == flow)
    }

    /// One cycle of arrivals (as long as the weights' sum), in smooth weighted
    /// round-robin order: each flow has exactly its share of every cycle, spread
    /// out, so a short run already has the mix's proportions and every run the
    /// same order. Arrival `n` runs `cycle[n % cycle.len()]`.
    pub fn cycle(&self) -> Vec<Flow> {
        let total: i64 = self.weights.iter().map(|(_, w)| i64::from(*w)).sum();
        let mut current = vec![0i64; self.weights.len()];
        let mut cycle = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        for _ in 0..total {
            let mut pick = 0;
            for (i, (_, weight)) in self.weights.iter().enumerate() {
                current[i] += i64::from(*weight);
                if current[i] > current[pick] {
                    pick = i;
                }
            }
            current[pick] -= total;
            cycle.push(self.weights[pick].0);
        }
        cycle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_scenarios_and_unknown_ones() {
        assert_eq!(
            Scenario::parse("browse").map(|s| s.weights),
            Ok(vec![(Flow::Browse, 1)])
        );
        let mixed = Scenario::parse("mixed").map_err(|e| e.to_string());
        assert_eq!(mixed.map(|s| s.weights.len()), Ok(3));
        let err = Scenario::parse("bogus")
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert!(err.is_err_and(|e| e.contains("unknown scenario `bogus`")));
    }

    #[test]
    fn a_mix_file_sets_weights_and_settings_and_refuses_unknown_keys() {
        let text = "name = \"heavy\"\n[weights]\nbrowse = 3\nbuy = 1\nsignup = 0\n[settings]\nsearch_percent = 50\npayment_methods = [\"pm_card_visa\", \"pm_card_chargeDeclined\"]\n";
        let scenario = Scenario::from_toml(text, Path::new("x.toml")).map_err(|e| e.to_string());
        let scenario = scenario.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(scenario.name, "heavy");
        assert_eq!(scenario.weights, vec![(Flow::Browse, 3), (Flow::Buy, 1)]);
        assert_eq!(scenario.settings.search_percent, 50);
        assert_eq!(scenario.settings.payment_methods.len(), 2);
        let bad = Scenario::from_toml(
            "[weights]\nbrowse = 1\n[settings]\nspeed = 3\n",
            Path::new("y.toml"),
        );
        assert!(bad.is_err_and(|e| e.to_string().contains("speed")));
        let bad_flow = Scenario::from_toml("[weights]\nfly = 1\n", Path::new("z.toml"));
        assert!(bad_flow.is_err());
    }

    #[test]
    fn arrivals_follow_the_weights_exactly_over_each_cycle() {
        let mixed = Scenario::parse("mixed").unwrap_or_else(|e| panic!("{e}"));
        let cycle = mixed.cycle();
        assert_eq!(cycle.len(), 100);
        let mut counts = std::collections::BTreeMap::new();
        for n in 0..1000 {
            *counts.entry(cycle[n % cycle.len()]).or_insert(0) += 1;
        }
        assert_eq!(counts.get(&Flow::Browse), Some(&800));
        assert_eq!(counts.get(&Flow::Buy), Some(&150));
        assert_eq!(counts.get(&Flow::Signup), Some(&50));
        // Spread out: no 15 buys in a row at the start of a cycle.
        let first_twenty = &cycle[..20];
        assert!(first_twenty.contains(&Flow::Browse) && first_twenty.contains(&Flow::Buy));
    }
}
