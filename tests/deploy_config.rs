//! `fly.toml` and the Dockerfile agree with the bridge: the kill timeout covers the longest
//! drain, Fly checks readiness (so a draining machine stops receiving calls), metrics are
//! scraped from the private admin listener and never from the public port, and the proxy's
//! concurrency limits fit `VOXRELAY_MAX_CALLS`.

use std::time::Duration;

use voxrelay::config::{DEFAULT_ADMIN_LISTEN, ListenerLimits};
use voxrelay::http::stop_budget;

fn fly() -> toml::Table {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/fly.toml")).unwrap();
    text.parse().unwrap()
}

fn env<'a>(fly: &'a toml::Table, name: &str) -> &'a str {
    fly["env"][name]
        .as_str()
        .unwrap_or_else(|| panic!("[env] {name}"))
}

fn seconds(value: &str) -> u64 {
    value.strip_suffix('s').unwrap().parse().unwrap()
}

fn port(listen: &str) -> i64 {
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[test]
fn the_kill_timeout_covers_the_longest_drain() {
    let fly = fly();
    let drain = Duration::from_secs(env(&fly, "VOXRELAY_DRAIN_SECONDS").parse().unwrap());
    let kill = Duration::from_secs(seconds(fly["kill_timeout"].as_str().unwrap()));
    assert!(
        kill >= stop_budget(drain) + Duration::from_secs(2),
        "kill_timeout {kill:?} does not cover a drain of up to {:?} with room to exit",
        stop_budget(drain)
    );
    assert_eq!(fly["kill_signal"].as_str(), Some("SIGTERM"));
}

#[test]
fn fly_checks_readiness_on_the_public_port_and_scrapes_the_admin_port() {
    let fly = fly();
    let service = fly["http_service"].as_table().unwrap();
    let public_port = service["internal_port"].as_integer().unwrap();
    assert_eq!(public_port, port(env(&fly, "VOXRELAY_LISTEN")));
    for check in service["checks"].as_array().unwrap() {
        assert_eq!(check["path"].as_str(), Some("/readyz"));
    }
    let metrics = fly["metrics"].as_table().unwrap();
    assert_eq!(metrics["path"].as_str(), Some("/metrics"));
    let admin_port = port(env(&fly, "VOXRELAY_ADMIN_LISTEN"));
    assert_eq!(metrics["port"].as_integer(), Some(admin_port));
    assert_ne!(admin_port, public_port);
    // Nothing routes the admin port from the internet.
    assert!(
        !fly.contains_key("services"),
        "a [[services]] block may expose another port"
    );
}

#[test]
fn the_proxy_limits_fit_max_calls() {
    let fly = fly();
    let max_calls: usize = env(&fly, "VOXRELAY_MAX_CALLS").parse().unwrap();
    let concurrency = fly["http_service"]["concurrency"].as_table().unwrap();
    assert_eq!(concurrency["type"].as_str(), Some("connections"));
    let soft = concurrency["soft_limit"].as_integer().unwrap() as usize;
    let hard = concurrency["hard_limit"].as_integer().unwrap() as usize;
    // New calls spread to other machines before this one is full...
    assert!(
        soft < max_calls,
        "soft_limit {soft} ≥ max calls {max_calls}"
    );
    // ...and when it is full, its webhook still gets through to say so.
    assert!(
        hard > max_calls,
        "hard_limit {hard} ≤ max calls {max_calls}"
    );
    assert!(hard <= ListenerLimits::for_calls(max_calls).max_connections);
}

#[test]
fn the_container_checks_itself_on_the_admin_listener() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let healthcheck = dockerfile
        .lines()
        .skip_while(|line| !line.starts_with("HEALTHCHECK"))
        .nth(1)
        .unwrap();
    let expected = format!("\"http://{DEFAULT_ADMIN_LISTEN}/healthz\"");
    assert!(healthcheck.contains(&expected), "{healthcheck}");
    assert!(!dockerfile.contains("/metrics\""));
}

#[test]
fn the_image_builds_the_bridge_alone() {
    let dockerfile =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    let build = dockerfile
        .lines()
        .find(|line| line.starts_with("RUN cargo build"))
        .unwrap();
    // No simulator, no reference control plane (and so no SQLite) in the production binary.
    assert!(build.contains("-p voxrelay "), "{build}");
    assert!(build.contains("--no-default-features"), "{build}");
    // Cargo reads every workspace member's manifest, built or not.
    assert!(
        dockerfile
            .lines()
            .any(|line| line == "COPY crates ./crates")
    );
}
