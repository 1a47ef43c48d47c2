//! The deployment files agree with the code: the Dockerfile, `deploy/compose.yaml`
//! and the rendered Kubernetes overlays (`deploy/k8s/rendered/*.yaml`, which
//! `scripts/check-deploy` keeps equal to `kubectl kustomize`). For every scaleshop
//! process they describe: each `SCALESHOP_*` variable is a configuration key, the
//! whole environment loads as a configuration (types and rules), the `--target`
//! parses and the service registry accepts it with that configuration (every
//! service it calls is in it or has an address); probes and health checks use the
//! paths the binary serves (`/healthz`, `/readyz`, `/metrics`, checked against the
//! real binary) on the port it listens on; the drain fits in the grace period;
//! and the gateways route exactly as `deploy/haproxy/haproxy.cfg.in` renders.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use scaleshop_app::{Config, Overrides, Target};
use serde::Deserialize;
use serde_norway::Value;

use crate::process::{Deployment, client};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// The configuration keys: the fields `Config` (de)serializes.
fn config_keys() -> BTreeSet<String> {
    let value = serde_json::to_value(Config::default()).expect("config as JSON");
    value
        .as_object()
        .expect("an object")
        .keys()
        .cloned()
        .collect()
}

/// A scaleshop process a deployment file describes.
#[derive(Debug)]
struct Process {
    /// Where it is described, for messages.
    origin: String,
    /// The arguments after the binary (`serve --target ...`).
    args: Vec<String>,
    /// Its `SCALESHOP_*` environment (the image's defaults not included).
    env: BTreeMap<String, String>,
}

impl Process {
    fn command(&self) -> &str {
        self.args.first().map(String::as_str).unwrap_or("serve")
    }

    fn target(&self) -> Target {
        let value = self
            .args
            .iter()
            .position(|a| a == "--target")
            .and_then(|i| self.args.get(i + 1))
            .unwrap_or_else(|| panic!("{}: no --target in {:?}", self.origin, self.args));
        value
            .parse()
            .unwrap_or_else(|e| panic!("{}: --target {value}: {e}", self.origin))
    }

    /// Its configuration, loaded as the binary loads it: the environment's values
    /// typed as the environment provider types them, every key checked
    /// (`deny_unknown_fields`) and the rules applied.
    fn config(&self, image_env: &BTreeMap<String, String>) -> Config {
        let keys = config_keys();
        let mut toml = String::new();
        let mut env = image_env.clone();
        env.extend(self.env.clone());
        for (name, value) in &env {
            // The allocator's own setting (docs/operations.md): read by mimalloc
            // before the program starts, not by the configuration.
            if name == "MIMALLOC_PURGE_DELAY" {
                assert!(
                    value.parse::<i64>().is_ok(),
                    "{}: {name}={value} is not a number of milliseconds",
                    self.origin
                );
                continue;
            }
            let key = name
                .strip_prefix("SCALESHOP_")
                .unwrap_or_else(|| panic!("{}: {name} is not a SCALESHOP_ variable", self.origin))
                .to_ascii_lowercase();
            assert!(
                keys.contains(&key),
                "{}: {name}: no configuration key {key}",
                self.origin
            );
            let typed = if value.parse::<i64>().is_ok() || value == "true" || value == "false" {
                value.clone()
            } else {
                serde_json::to_string(value).expect("a string")
            };
            toml.push_str(&format!("{key} = {typed}\n"));
        }
        let file =
            std::env::temp_dir().join(format!("scaleshop-deploy-{}.toml", uuid::Uuid::new_v4()));
        std::fs::write(&file, toml).expect("write the configuration");
        let config = Config::load(Some(&file), &Overrides::default());
        std::fs::remove_file(&file).ok();
        config.unwrap_or_else(|e| {
            panic!(
                "{}: its environment is not a valid configuration: {e}",
                self.origin
            )
        })
    }

    /// Loads the configuration and checks the target against the registry.
    fn check(&self, image_env: &BTreeMap<String, String>) -> Config {
        let config = self.config(image_env);
        let target = self.target();
        match self.command() {
            "serve" => scaleshop_app::registry::check(target, &config)
                .unwrap_or_else(|e| panic!("{}: the registry refuses it: {e}", self.origin)),
            "migrate" => assert!(
                target.is_all(),
                "{}: migrate every module's tables",
                self.origin
            ),
            other => panic!("{}: unexpected command {other}", self.origin),
        }
        config
    }
}

/// The port of `http_addr` (`:PORT` or `HOST:PORT`).
fn port_of(config: &Config) -> u16 {
    config
        .http_addr
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or_else(|| panic!("http_addr {} has no port", config.http_addr))
}

/// `http://HOST:PORT/PATH` -> (port, path).
fn url_port_path(url: &str) -> (u16, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("{url}: not http://"));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let port = authority
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("{url}: no port"));
    (port, format!("/{path}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| items.iter().map(scalar).collect())
        .unwrap_or_default()
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => panic!("not a scalar: {other:?}"),
    }
}

// ---------------------------------------------------------------- Dockerfile

struct Image {
    env: BTreeMap<String, String>,
    expose: u16,
    healthcheck_url: String,
    user: String,
    cmd: Vec<String>,
}

/// The Dockerfile's last stage, its instructions with continuation lines joined.
fn image() -> Image {
    let text = read("Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
        } else {
            current.push_str(line);
            instructions.push(std::mem::take(&mut current));
        }
    }
    let last_from = instructions
        .iter()
        .rposition(|i| i.starts_with("FROM "))
        .expect("a FROM");
    let mut image = Image {
        env: BTreeMap::new(),
        expose: 0,
        healthcheck_url: String::new(),
        user: String::new(),
        cmd: Vec::new(),
    };
    let json_array = |s: &str| -> Vec<String> {
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("not a JSON array: {s}: {e}"))
    };
    for instruction in &instructions[last_from..] {
        let (word, rest) = instruction.split_once(' ').unwrap_or((instruction, ""));
        match word {
            "ENV" => {
                for pair in rest.split_whitespace() {
                    let (k, v) = pair.split_once('=').unwrap_or_else(|| panic!("ENV {pair}"));
                    image.env.insert(k.to_owned(), v.to_owned());
                }
            }
            "EXPOSE" => image.expose = rest.trim().parse().expect("EXPOSE a port"),
            "USER" => image.user = rest.trim().to_owned(),
            "CMD" => image.cmd = json_array(rest),
            "HEALTHCHECK" => {
                let (_, command) = rest.split_once("CMD ").expect("HEALTHCHECK CMD");
                image.healthcheck_url = json_array(command)
                    .into_iter()
                    .find(|a| a.starts_with("http://"))
                    .expect("a URL in the health check");
            }
            _ => {}
        }
    }
    image
}

#[test]
fn the_image_runs_as_a_user_on_its_exposed_port_with_a_liveness_check() {
    let image = image();
    let process = Process {
        origin: "Dockerfile".to_owned(),
        args: image.cmd.clone(),
        env: BTreeMap::new(),
    };
    assert_eq!(process.command(), "serve");
    assert!(process.target().is_all());
    let config = process.config(&image.env);
    assert_eq!(
        port_of(&config),
        image.expose,
        "EXPOSE and SCALESHOP_HTTP_ADDR"
    );
    let (port, path) = url_port_path(&image.healthcheck_url);
    assert_eq!(
        (port, path.as_str()),
        (image.expose, "/healthz"),
        "HEALTHCHECK"
    );
    let uid: u32 = image
        .user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("USER a numeric uid");
    assert_ne!(uid, 0, "the image runs as root");
    assert!(
        config.data_dir.starts_with("/var/lib/scaleshop"),
        "the data folder is under the volume"
    );
}

// ---------------------------------------------------------------- compose

/// `${NAME:-default}` -> default, as compose interpolates with NAME unset.
fn interpolate(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let end = rest[start..]
            .find('}')
            .map(|e| start + e)
            .expect("a closing brace");
        let inner = &rest[start + 2..end];
        let (_, default) = inner
            .split_once(":-")
            .unwrap_or_else(|| panic!("${{{inner}}} has no default"));
        out.push_str(default);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    out
}

fn compose() -> Value {
    let mut value: Value =
        serde_norway::from_str(&read("deploy/compose.yaml")).expect("compose YAML");
    value.apply_merge().expect("merge keys");
    value
}

fn compose_env(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_mapping()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (scalar(k), interpolate(&scalar(v))))
                .collect()
        })
        .unwrap_or_default()
}

/// The services running the scaleshop image: name -> (service, process).
fn compose_processes(compose: &Value, image: &Image) -> BTreeMap<String, (Value, Process)> {
    let mut out = BTreeMap::new();
    for (name, service) in compose["services"].as_mapping().expect("services") {
        let name = scalar(name);
        let uses_image = service["image"]
            .as_str()
            .is_some_and(|i| interpolate(i).starts_with("scaleshop"));
        if !uses_image {
            continue;
        }
        let args = strings(&service["command"]);
        let args = if args.is_empty() {
            image.cmd.clone()
        } else {
            args
        };
        let process = Process {
            origin: format!("compose service {name}"),
            args,
            env: compose_env(service),
        };
        out.insert(name, (service.clone(), process));
    }
    out
}

#[test]
fn every_compose_process_has_a_valid_configuration_and_target_and_waits_for_the_migration() {
    let image = image();
    let compose = compose();
    let processes = compose_processes(&compose, &image);
    let migrations: Vec<_> = processes
        .values()
        .filter(|(_, p)| p.command() == "migrate")
        .collect();
    assert_eq!(migrations.len(), 1, "one migration service");
    let mut served = BTreeMap::<String, usize>::new();
    for (name, (service, process)) in &processes {
        let config = process.check(&image.env);
        assert!(
            config
                .database_url
                .as_ref()
                .is_some_and(|u| u.expose().starts_with("postgres://")),
            "{name}: PostgreSQL"
        );
        if process.command() != "serve" {
            continue;
        }
        *served.entry(process.target().to_string()).or_default() += 1;
        assert!(
            config.read_replica_urls.is_some(),
            "{name}: reads from the replica"
        );
        assert!(config.redis_url.is_some(), "{name}: the shared cache");
        assert_eq!(
            config.image_dir.as_deref(),
            Some(Path::new("/var/lib/scaleshop/images")),
            "{name}: the shared image folder"
        );
        let mounts = strings(&service["volumes"]);
        assert!(
            mounts
                .iter()
                .any(|m| m.ends_with(":/var/lib/scaleshop/images")),
            "{name}: the images volume is mounted: {mounts:?}"
        );
        let migrate = &service["depends_on"]["migrate"]["condition"];
        assert_eq!(
            migrate.as_str(),
            Some("service_completed_successfully"),
            "{name}"
        );
        // Ready means /readyz on the port it listens on.
        let test = strings(&service["healthcheck"]["test"]);
        let url = test
            .iter()
            .find(|a| a.starts_with("http://"))
            .expect("a URL");
        assert_eq!(
            url_port_path(url),
            (port_of(&config), "/readyz".to_owned()),
            "{name}"
        );
        let grace = service["stop_grace_period"]
            .as_str()
            .expect("stop_grace_period");
        let grace: u64 = grace.trim_end_matches('s').parse().expect("seconds");
        assert!(
            grace > config.shutdown_grace_secs,
            "{name}: stop_grace_period {grace}s"
        );
        // A service it calls over HTTP: the gateway's address for calls between services.
        for url in [
            &config.service_url_users,
            &config.service_url_catalog,
            &config.service_url_inventory,
            &config.service_url_payments,
            &config.service_url_orders,
            &config.service_url_notifications,
            &config.service_url_media,
        ]
        .into_iter()
        .flatten()
        {
            assert_eq!(url, "http://gateway:8081", "{name}");
        }
    }
    // Two of each split group.
    let groups: BTreeMap<String, usize> = split_groups()
        .into_iter()
        .map(|(_, t)| (t.parse::<Target>().expect("a target").to_string(), 2))
        .collect();
    assert_eq!(served, groups);
    // The gateway starts once every instance is ready.
    let gateway = &compose["services"]["gateway"];
    for (name, (_, process)) in &processes {
        if process.command() == "serve" {
            assert_eq!(
                gateway["depends_on"][name.as_str()]["condition"].as_str(),
                Some("service_healthy"),
                "the gateway waits for {name}"
            );
        }
    }
}

/// `SPLIT_GROUPS` of scripts/cluster: (name, target).
fn split_groups() -> Vec<(String, String)> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(". \"$1\" && printf '%s\\n' \"${SPLIT_GROUPS[@]}\"")
        .arg("bash")
        .arg(root().join("scripts/cluster"))
        .output()
        .expect("run bash");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("UTF-8")
        .lines()
        .map(|l| {
            let (name, target) = l.split_once(':').expect("name:target");
            (name.to_owned(), target.to_owned())
        })
        .collect()
}

#[test]
fn prometheus_in_compose_scrapes_every_instance() {
    let image = image();
    let processes = compose_processes(&compose(), &image);
    let prometheus: Value =
        serde_norway::from_str(&read("deploy/prometheus/compose.yml")).expect("YAML");
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    let scraped: BTreeSet<String> = strings(&job["static_configs"][0]["targets"])
        .into_iter()
        .collect();
    let instances: BTreeSet<String> = processes
        .iter()
        .filter(|(_, (_, p))| p.command() == "serve")
        .map(|(name, (_, p))| format!("{name}:{}", port_of(&p.config(&image.env))))
        .collect();
    assert_eq!(scraped, instances);
}

// ---------------------------------------------------------------- Kubernetes

fn k8s(overlay: &str) -> Vec<Value> {
    let text = read(&format!("deploy/k8s/rendered/{overlay}.yaml"));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn of_kind<'a>(objects: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    objects
        .iter()
        .filter(move |o| o["kind"].as_str() == Some(kind))
}

/// A pod template's scaleshop container as a process, with its environment
/// from the ConfigMaps and Secrets it names.
fn k8s_process(objects: &[Value], origin: &str, container: &Value) -> Process {
    let mut env = BTreeMap::new();
    for from in container["envFrom"].as_sequence().into_iter().flatten() {
        if let Some(name) = from["configMapRef"]["name"].as_str() {
            for (k, v) in named(objects, "ConfigMap", name)["data"]
                .as_mapping()
                .expect("data")
            {
                env.insert(scalar(k), scalar(v));
            }
        }
        if let Some(name) = from["secretRef"]["name"].as_str() {
            let secret = named(objects, "Secret", name);
            for (k, v) in secret["data"].as_mapping().into_iter().flatten() {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(scalar(v).split_whitespace().collect::<String>())
                    .expect("base64");
                env.insert(scalar(k), String::from_utf8(bytes).expect("UTF-8"));
            }
            for (k, v) in secret["stringData"].as_mapping().into_iter().flatten() {
                env.insert(scalar(k), scalar(v));
            }
        }
    }
    for var in container["env"].as_sequence().into_iter().flatten() {
        env.insert(
            var["name"].as_str().expect("name").to_owned(),
            var["value"].as_str().expect("a literal value").to_owned(),
        );
    }
    Process {
        origin: origin.to_owned(),
        args: strings(&container["args"]),
        env,
    }
}

fn scaleshop_containers(pod: &Value) -> impl Iterator<Item = &Value> {
    pod["containers"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter(|c| {
            c["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("scaleshop:"))
        })
}

/// A probe's (path, container port).
fn probe(container: &Value, kind: &str) -> (String, u64) {
    let get = &container[kind]["httpGet"];
    let path = get["path"]
        .as_str()
        .unwrap_or_else(|| panic!("{kind}: httpGet path"))
        .to_owned();
    let port = match &get["port"] {
        Value::Number(n) => n.as_u64().expect("a port"),
        Value::String(name) => container["ports"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{kind}: no port named {name}")),
        other => panic!("{kind}: port {other:?}"),
    };
    (path, port)
}

fn check_overlay(overlay: &str, expected_targets: &[&str]) {
    let image = image();
    let objects = k8s(overlay);
    let mut targets = Vec::new();
    for job in of_kind(&objects, "Job") {
        let name = job["metadata"]["name"].as_str().expect("name");
        let pod = &job["spec"]["template"]["spec"];
        for container in scaleshop_containers(pod) {
            let process = k8s_process(&objects, &format!("{overlay}: Job {name}"), container);
            assert_eq!(process.command(), "migrate");
            process.check(&image.env);
        }
    }
    for deployment in of_kind(&objects, "Deployment") {
        let name = deployment["metadata"]["name"].as_str().expect("name");
        let pod = &deployment["spec"]["template"]["spec"];
        for container in scaleshop_containers(pod) {
            let origin = format!("{overlay}: Deployment {name}");
            let process = k8s_process(&objects, &origin, container);
            assert_eq!(process.command(), "serve", "{origin}");
            let config = process.check(&image.env);
            targets.push(process.target().to_string());
            let port = u64::from(port_of(&config));
            assert_eq!(
                probe(container, "livenessProbe"),
                ("/healthz".to_owned(), port),
                "{origin}"
            );
            assert_eq!(
                probe(container, "readinessProbe"),
                ("/readyz".to_owned(), port),
                "{origin}"
            );
            assert_eq!(
                probe(container, "startupProbe"),
                ("/healthz".to_owned(), port),
                "{origin}"
            );
            // The pod's grace covers the preStop pause and the drain.
            let pause: u64 = strings(&container["lifecycle"]["preStop"]["exec"]["command"])
                .get(1)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let grace = pod["terminationGracePeriodSeconds"]
                .as_u64()
                .expect("a grace period");
            assert!(
                grace > pause + config.shutdown_grace_secs,
                "{origin}: grace {grace} s"
            );
            // Hardened: non-root, read-only, no escalation, no capabilities.
            let security = &container["securityContext"];
            assert_eq!(
                security["readOnlyRootFilesystem"].as_bool(),
                Some(true),
                "{origin}"
            );
            assert_eq!(
                security["allowPrivilegeEscalation"].as_bool(),
                Some(false),
                "{origin}"
            );
            assert_eq!(
                strings(&security["capabilities"]["drop"]),
                ["ALL"],
                "{origin}"
            );
            assert_eq!(
                pod["securityContext"]["runAsNonRoot"].as_bool(),
                Some(true),
                "{origin}"
            );
            // The waits for the migration Job that exists here.
            let wait = pod["initContainers"][0]["args"].clone();
            let job = strings(&wait)
                .into_iter()
                .find_map(|a| a.strip_prefix("job/").map(str::to_owned))
                .expect("waits for a job");
            named(&objects, "Job", &job);
            // A Service on its port, an autoscaler and a disruption budget that select it.
            let labels = deployment["spec"]["template"]["metadata"]["labels"].clone();
            let selects = |selector: &Value| {
                selector.as_mapping().is_some_and(|m| {
                    m.iter()
                        .all(|(k, v)| labels.as_mapping().and_then(|l| l.get(k)) == Some(v))
                })
            };
            let http_port_name = container["ports"][0]["name"].as_str().unwrap_or("");
            let serves = |service: &Value| {
                service["spec"]["ports"]
                    .as_sequence()
                    .into_iter()
                    .flatten()
                    .any(|p| {
                        let target = scalar(&p["targetPort"]);
                        target == http_port_name || target == port.to_string()
                    })
            };
            assert!(
                of_kind(&objects, "Service").any(|s| selects(&s["spec"]["selector"]) && serves(s)),
                "{origin}: no Service"
            );
            assert!(
                of_kind(&objects, "PodDisruptionBudget")
                    .any(|p| selects(&p["spec"]["selector"]["matchLabels"])),
                "{origin}: no PodDisruptionBudget"
            );
            assert!(
                of_kind(&objects, "HorizontalPodAutoscaler")
                    .any(|h| h["spec"]["scaleTargetRef"]["name"].as_str() == Some(name)),
                "{origin}: no HorizontalPodAutoscaler"
            );
        }
    }
    targets.sort();
    let mut expected: Vec<String> = expected_targets
        .iter()
        .map(|t| t.parse::<Target>().expect("a target").to_string())
        .collect();
    expected.sort();
    assert_eq!(targets, expected, "{overlay}: the Deployments' targets");
}

#[test]
fn the_monolith_overlay_runs_target_all_with_probes_on_the_served_paths() {
    check_overlay("monolith", &["all"]);
}

#[test]
fn the_split_overlay_runs_each_group_with_the_addresses_it_needs() {
    let groups = split_groups();
    let targets: Vec<&str> = groups.iter().map(|(_, t)| t.as_str()).collect();
    check_overlay("split", &targets);
}

// ---------------------------------------------------------------- the gateways

/// The routing of a gateway configuration: its acl, use_backend, default_backend
/// and http-request lines (the port of the services address left out), and its
/// backends with their servers' names.
fn routing(cfg: &str) -> (Vec<String>, BTreeMap<String, BTreeSet<String>>) {
    let mut rules = Vec::new();
    let mut backends = BTreeMap::<String, BTreeSet<String>>::new();
    let mut backend = None;
    for line in cfg.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("backend ") {
            backend = Some(name.to_owned());
            backends.entry(name.to_owned()).or_default();
        } else if line.starts_with("frontend ")
            || line.starts_with("listen ")
            || line.starts_with("resolvers ")
        {
            backend = None;
        } else if let (Some(b), Some(server)) = (&backend, line.strip_prefix("server ")) {
            backends
                .get_mut(b)
                .expect("a backend")
                .insert(server.split_whitespace().next().expect("a name").to_owned());
        } else if line.starts_with("acl from_services dst_port ") {
            rules.push("acl from_services dst_port PORT".to_owned());
        } else if ["acl ", "use_backend ", "default_backend ", "http-request "]
            .iter()
            .any(|p| line.starts_with(p))
        {
            rules.push(line.to_owned());
        }
    }
    (rules, backends)
}

/// What `render_gateway` of scripts/cluster writes for PLAN (name target) on
/// local ports, with or without the services address.
fn rendered(plan: &[(String, String)], services: bool) -> String {
    let dir = std::env::temp_dir().join(format!("scaleshop-deploy-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a folder");
    let out = dir.join("haproxy.cfg");
    let entries: Vec<String> = plan
        .iter()
        .enumerate()
        .map(|(i, (name, target))| format!("{name} {target} {}", 20000 + i))
        .collect();
    let status = Command::new("bash")
        .arg("-c")
        .arg(
            ". \"$1\" && shift 4 && PLAN=(\"$@\") && render_gateway 10001 10002 \"$OUT\" $SERVICES",
        )
        .arg("bash")
        .arg(root().join("scripts/cluster"))
        .args(["-", "-", "-"])
        .args(&entries)
        .env("OUT", &out)
        .env("SERVICES", if services { "10003" } else { "" })
        .status()
        .expect("run bash");
    assert!(status.success());
    let text = std::fs::read_to_string(&out).expect("the rendered file");
    std::fs::remove_dir_all(&dir).ok();
    text
}

#[test]
fn the_compose_gateway_routes_as_the_template_renders_to_every_instance() {
    let image = image();
    let compose = compose();
    let processes = compose_processes(&compose, &image);
    let plan: Vec<(String, String)> = processes
        .iter()
        .filter(|(_, (_, p))| p.command() == "serve")
        .map(|(name, (_, p))| (name.clone(), p.args[2].clone()))
        .collect();
    let committed = read("deploy/compose/haproxy.cfg");
    assert_eq!(routing(&committed), routing(&rendered(&plan, true)));
    // Every server is an instance on the port it listens on.
    for (name, (_, process)) in &processes {
        if process.command() == "serve" {
            let port = port_of(&process.config(&image.env));
            assert!(
                committed.contains(&format!("server {name} {name}:{port} check")),
                "{name}"
            );
        }
    }
    // The services address the instances are given is the gateway's second bind.
    assert!(committed.contains("    bind :8081\n"));
    assert!(
        compose["services"]["gateway"]["ports"]
            .as_sequence()
            .is_some_and(|p| { p.iter().all(|p| !scalar(p).contains("8081")) }),
        "the services address is not published"
    );
}

#[test]
fn the_kubernetes_gateways_route_as_the_template_renders_to_every_service() {
    for overlay in ["monolith", "split"] {
        let objects = k8s(overlay);
        let config = of_kind(&objects, "ConfigMap")
            .find(|c| {
                c["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("scaleshop-gateway-"))
            })
            .expect("the gateway's ConfigMap");
        let cfg = config["data"]["haproxy.cfg"].as_str().expect("haproxy.cfg");
        // One server per Deployment: its Service.
        let plan: Vec<(String, String)> = of_kind(&objects, "Deployment")
            .flat_map(|d| {
                let name = d["metadata"]["name"].as_str().expect("name").to_owned();
                scaleshop_containers(&d["spec"]["template"]["spec"])
                    .map(|c| (name.clone(), strings(&c["args"])[2].clone()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(routing(cfg), routing(&rendered(&plan, false)), "{overlay}");
        for (name, _) in &plan {
            let service = named(&objects, "Service", name);
            let port = service["spec"]["ports"][0]["port"]
                .as_u64()
                .expect("a port");
            assert!(
                cfg.contains(&format!("server {name} {name}:{port} check")),
                "{overlay}: {name}"
            );
        }
        assert!(
            !cfg.contains("from_services"),
            "{overlay}: /internal/ is closed on the gateway"
        );
    }
}

// ---------------------------------------------------------------- the binary

/// Every probe, health check and scrape path in the files, against the binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_paths_the_files_probe_are_served_by_the_binary() {
    let mut paths = BTreeSet::new();
    paths.insert(url_port_path(&image().healthcheck_url).1);
    for overlay in ["monolith", "split"] {
        for deployment in of_kind(&k8s(overlay), "Deployment") {
            for container in scaleshop_containers(&deployment["spec"]["template"]["spec"]) {
                for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
                    paths.insert(probe(container, kind).0);
                }
            }
        }
    }
    let compose = compose();
    for (_, (service, _)) in compose_processes(&compose, &image()) {
        for arg in strings(&service["healthcheck"]["test"]) {
            if arg.starts_with("http://") {
                paths.insert(url_port_path(&arg).1);
            }
        }
    }
    let prometheus: Value =
        serde_norway::from_str(&read("deploy/prometheus/compose.yml")).expect("YAML");
    paths.insert(scalar(&prometheus["scrape_configs"][0]["metrics_path"]));
    assert_eq!(
        paths,
        ["/healthz", "/metrics", "/readyz"]
            .map(str::to_owned)
            .into_iter()
            .collect()
    );

    let server = Deployment::fresh(scaleshop_testkit::Backend::Sqlite)
        .await
        .start()
        .await;
    let http = client();
    for path in &paths {
        let response = http.get(server.url(path)).send().await.expect("GET");
        assert_eq!(response.status(), 200, "{path}");
        if path == "/metrics" {
            let body = response.text().await.expect("body");
            assert!(body.contains("# TYPE "), "Prometheus text: {body}");
        }
    }
}
