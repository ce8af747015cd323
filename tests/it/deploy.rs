//! The install files in `deploy/`: every YAML file parses; the Kubernetes
//! manifests run one sled replica (StatefulSet) or two on PostgreSQL
//! (Deployment, PodDisruptionBudget, readiness on `/readyz`, the mirror on
//! an emptyDir, the database password from a Secret); the docker-compose
//! try-out starts PostgreSQL, slapd and two replicas; and the config each
//! of them mounts passes `jitbot check-config` with the environment the
//! file gives the container.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(path)
}

/// The YAML documents of `path`, as JSON, read by PyYAML; a machine
/// without it fails here, loudly.
fn yaml(path: &Path) -> Vec<Value> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))",
        ])
        .arg(path)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3 ({e}): install Debian's `python3-yaml`"));
    assert!(
        out.status.success(),
        "{} is not valid YAML (or python3-yaml is missing: scripts/test installs it):\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python3 printed JSON")
}

/// `jitbot check-config --offline` on `config` with exactly `env` set:
/// the exit code and what it printed.
fn check_config(config: &str, env: &[(String, String)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jitbot.toml");
    std::fs::write(&path, config).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_jitbot"));
    cmd.args(["check-config", "--offline", "--config"])
        .arg(&path)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run jitbot check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The one container of a workload's pod template.
fn container(workload: &Value) -> &Value {
    let containers = workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "{workload:#}");
    &containers[0]
}

/// The volume mounted at `mount` in a workload's container.
fn volume_at<'a>(workload: &'a Value, mount: &str) -> &'a Value {
    let name = container(workload)["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == mount)
        .unwrap_or_else(|| panic!("nothing mounted at {mount}"))["name"]
        .clone();
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

#[test]
fn every_yaml_file_in_deploy_parses() {
    let mut files = Vec::new();
    let mut dirs = vec![deploy("")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")) {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 6, "only {files:?}");
    for file in files {
        let docs = yaml(&file);
        assert!(
            docs.iter().all(Value::is_object),
            "{}: a document is not a mapping: {docs:?}",
            file.display()
        );
    }
}

#[test]
fn the_sled_manifest_runs_one_replica_with_a_volume_of_its_own() {
    let docs = yaml(&deploy("kubernetes/jitbot.yaml"));
    let sets = of_kind(&docs, "StatefulSet");
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["spec"]["replicas"], 1, "sled allows one process");
    assert!(of_kind(&docs, "Deployment").is_empty());
    let claims = sets[0]["spec"]["volumeClaimTemplates"].as_array().unwrap();
    let mounted = container(sets[0])["volumeMounts"].as_array().unwrap();
    assert!(
        mounted
            .iter()
            .any(|m| m["mountPath"] == "/var/lib/jitbot" && m["name"] == claims[0]["metadata"]["name"]),
        "the store is not on the persistent volume: {mounted:?}"
    );
}

#[test]
fn the_postgres_manifest_runs_two_replicas_whose_config_checks() {
    let docs = yaml(&deploy("kubernetes/jitbot-postgres.yaml"));
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(deployments.len(), 1);
    assert!(of_kind(&docs, "StatefulSet").is_empty());
    let app = deployments[0];
    assert!(app["spec"]["replicas"].as_u64().unwrap() >= 2, "{app:#}");
    let labels = &app["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&app["spec"]["selector"]["matchLabels"], labels);

    // A drain never takes every replica.
    let budgets = of_kind(&docs, "PodDisruptionBudget");
    assert_eq!(budgets.len(), 1);
    assert_eq!(budgets[0]["spec"]["selector"]["matchLabels"], *labels);
    assert!(budgets[0]["spec"]["minAvailable"].as_u64().unwrap() >= 1);

    let jitbot = container(app);
    assert_eq!(jitbot["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(jitbot["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(
        volume_at(app, "/var/lib/jitbot")["emptyDir"].is_object(),
        "the mirror belongs on an emptyDir"
    );

    // Every variable comes from a Secret, the database password included.
    let mut env = Vec::new();
    for var in jitbot["env"].as_array().expect("env") {
        let name = var["name"].as_str().unwrap().to_string();
        assert!(
            var["valueFrom"]["secretKeyRef"]["name"].is_string(),
            "{name} is not read from a Secret: {var}"
        );
        env.push((
            name.clone(),
            format!("{}-value-for-the-check", name.to_lowercase()),
        ));
    }
    assert!(env.iter().any(|(n, _)| n == "JITBOT_DB_PASSWORD"), "{env:?}");

    // The config the pods mount: the ConfigMap the config volume names.
    let config_map = volume_at(app, "/etc/jitbot")["configMap"]["name"].clone();
    let maps = of_kind(&docs, "ConfigMap");
    let map = maps
        .iter()
        .find(|m| m["metadata"]["name"] == config_map)
        .expect("the ConfigMap the pods mount");
    let config = map["data"]["jitbot.toml"].as_str().expect("jitbot.toml");
    assert!(config.contains("kind = \"postgres\""), "{config}");
    assert!(config.contains("path = \"/var/lib/jitbot/"), "{config}");
    // TLS to the database, its CA mounted where the config says.
    assert!(config.contains("sslmode=verify-full"), "{config}");
    assert!(
        volume_at(app, "/etc/jitbot-postgres-ca")["secret"]["secretName"].is_string(),
        "the PostgreSQL CA is not mounted"
    );
    assert!(
        config.contains("ca_file = \"/etc/jitbot-postgres-ca/"),
        "{config}"
    );
    let (code, out) = check_config(config, &env);
    assert_eq!(code, Some(0), "the manifest's config fails check-config:\n{out}");
    // The check reads the environment: without the password it refuses.
    let without: Vec<_> = env
        .iter()
        .filter(|(n, _)| n != "JITBOT_DB_PASSWORD")
        .cloned()
        .collect();
    let (code, out) = check_config(config, &without);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("store.password"), "{out}");
}

#[test]
fn the_compose_try_out_starts_postgres_slapd_and_two_replicas_whose_config_checks() {
    let path = deploy("compose/docker-compose.yml");
    let compose = yaml(&path).remove(0);
    let services = compose["services"].as_object().expect("services");
    assert!(services.contains_key("postgres"), "{services:?}");
    assert!(services.contains_key("slapd"), "{services:?}");
    let replicas: Vec<_> = services
        .iter()
        .filter(|(_, s)| s["command"][0] == "run")
        .collect();
    assert_eq!(replicas.len(), 2, "two jitbot replicas: {services:?}");
    for (name, service) in &replicas {
        assert_eq!(
            service["depends_on"]["postgres"]["condition"], "service_healthy",
            "{name} starts before PostgreSQL is up"
        );
        let volumes: Vec<&str> = service["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert!(
            volumes.contains(&"./jitbot.toml:/etc/jitbot/jitbot.toml:ro"),
            "{name}: {volumes:?}"
        );
        let mirror = volumes
            .iter()
            .find(|v| v.ends_with(":/var/lib/jitbot"))
            .unwrap_or_else(|| panic!("{name} keeps no mirror volume: {volumes:?}"));
        assert!(
            replicas
                .iter()
                .filter(|(_, s)| s["volumes"].as_array().unwrap().iter().any(|v| v == mirror))
                .count()
                == 1,
            "two replicas share the mirror {mirror}"
        );
    }
    let env: Vec<(String, String)> = replicas[0].1["environment"]
        .as_object()
        .expect("environment")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    // The database and the directory get the passwords jitbot is given.
    let given = |var: &str| env.iter().find(|(k, _)| k == var).map(|(_, v)| v.clone());
    assert_eq!(
        given("JITBOT_DB_PASSWORD"),
        services["postgres"]["environment"]["POSTGRES_PASSWORD"]
            .as_str()
            .map(String::from)
    );
    assert_eq!(
        given("JITBOT_LDAP_PASSWORD"),
        services["slapd"]["environment"]["LDAP_ADMIN_PASSWORD"]
            .as_str()
            .map(String::from)
    );
    let config = std::fs::read_to_string(deploy("compose/jitbot.toml")).unwrap();
    let (code, out) = check_config(&config, &env);
    assert_eq!(code, Some(0), "the try-out's config fails check-config:\n{out}");
    let seed = std::fs::read_to_string(deploy("compose/seed.ldif")).unwrap();
    for dn in [
        "cn=db-admins,ou=groups,dc=example,dc=org",
        "uid=alice,ou=people,dc=example,dc=org",
    ] {
        assert!(seed.contains(&format!("dn: {dn}\n")), "seed.ldif lacks {dn}");
    }
}
