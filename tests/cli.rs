//! The `voxrelay` binary itself: start-up validation (no production setting falls back to a
//! toy or an insecure default silently), `serve` with the built-in mock model asked for,
//! `call` against it, and SIGTERM draining.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_voxrelay");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn clean_command(args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("TWILIO_AUTH_TOKEN")
        .env_remove("OPENAI_API_KEY")
        .env_remove("VOXRELAY_PUBLIC_URL")
        .env_remove("VOXRELAY_MOCK_MODEL")
        .env_remove("VOXRELAY_OPENAI_URL")
        .env_remove("VOXRELAY_CONTROL_PLANE_URL")
        .env_remove("VOXRELAY_TWILIO_ACCOUNT_SID")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    command
}

#[test]
fn serve_refuses_to_start_without_a_twilio_auth_token() {
    let output = clean_command(&["serve", "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("TWILIO_AUTH_TOKEN"), "{stderr}");
}

/// Runs `serve` with `env` (on top of a clean environment) and expects it to refuse to start:
/// returns its one-line reason.
fn serve_refusal(env: &[(&str, &str)]) -> String {
    let mut command = clean_command(&["serve", "--listen", "127.0.0.1:0"]);
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().unwrap();
    assert!(!output.status.success(), "serve started with {env:?}");
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

const BASE: [(&str, &str); 3] = [
    ("TWILIO_AUTH_TOKEN", "cli-test-token"),
    ("VOXRELAY_PUBLIC_URL", "https://voice.example.com"),
    ("OPENAI_API_KEY", "sk-cli-test-key"),
];

/// [`BASE`] with `name` removed and `extra` added.
fn base_with(
    without: Option<&str>,
    extra: &[(&'static str, &'static str)],
) -> Vec<(&'static str, &'static str)> {
    BASE.iter()
        .filter(|(name, _)| Some(*name) != without)
        .chain(extra)
        .copied()
        .collect()
}

#[test]
fn serve_refuses_to_start_without_a_public_url() {
    let reason = serve_refusal(&base_with(Some("VOXRELAY_PUBLIC_URL"), &[]));
    assert!(
        reason.contains("VOXRELAY_PUBLIC_URL is not set"),
        "{reason}"
    );
}

#[test]
fn serve_refuses_to_fall_back_to_the_mock_model_or_send_secrets_in_clear() {
    let reason = serve_refusal(&base_with(Some("OPENAI_API_KEY"), &[]));
    assert!(
        reason.contains("OPENAI_API_KEY is not set") && reason.contains("--mock-model"),
        "{reason}"
    );
    let reason = serve_refusal(&base_with(
        Some("OPENAI_API_KEY"),
        &[("VOXRELAY_MOCK_MODEL", "0")],
    ));
    assert!(reason.contains("OPENAI_API_KEY is not set"), "{reason}");
    let reason = serve_refusal(&base_with(
        None,
        &[("VOXRELAY_OPENAI_URL", "ws://10.0.0.5:9000/v1/realtime")],
    ));
    assert!(reason.contains("plain ws://"), "{reason}");
    assert!(!reason.contains("sk-cli-test-key"), "{reason}");
    let reason = serve_refusal(&base_with(
        None,
        &[
            ("VOXRELAY_CONTROL_PLANE_URL", "http://cp.example.com"),
            ("VOXRELAY_CONTROL_PLANE_KEY_ID", "k1"),
            ("VOXRELAY_CONTROL_PLANE_SECRET", "cp-secret"),
        ],
    ));
    assert!(reason.contains("plain http://"), "{reason}");
    assert!(!reason.contains("cp-secret"), "{reason}");
    let reason = serve_refusal(&base_with(
        None,
        &[("VOXRELAY_TWILIO_ACCOUNT_SID", "AC123")],
    ));
    assert!(reason.contains("VOXRELAY_TWILIO_ACCOUNT_SID"), "{reason}");
}

#[test]
fn serve_with_mock_model_answers_a_call_and_drains_on_sigterm() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let admin = format!("127.0.0.1:{}", free_port());
    let mut server = clean_command(&["serve", "--mock-model"])
        .env("VOXRELAY_LISTEN", &listen)
        .env("VOXRELAY_PUBLIC_URL", format!("http://{listen}"))
        .env("VOXRELAY_ADMIN_LISTEN", &admin)
        .env("TWILIO_AUTH_TOKEN", "cli-test-token")
        .env("VOXRELAY_DRAIN_SECONDS", "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // tracing writes to stdout; read lines until the bridge says it is ready.
    let stdout = server.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && !seen.iter().any(|l: &String| l.contains("bridge ready")) {
        if let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(line);
        }
    }
    let mock_lines = seen
        .iter()
        .filter(|l| l.contains("--mock-model: calls go to the built-in mock"))
        .count();
    assert_eq!(
        mock_lines, 1,
        "expected one line about the mock model: {seen:#?}"
    );
    assert!(seen.iter().any(|l| l.contains("bridge ready")), "{seen:#?}");

    let call = clean_command(&[
        "call",
        "--to",
        &format!("http://{listen}"),
        "--admin-url",
        &format!("http://{admin}"),
        "--linger-seconds",
        "1",
    ])
    .env("TWILIO_AUTH_TOKEN", "cli-test-token")
    .output()
    .unwrap();
    let printed = String::from_utf8_lossy(&call.stdout);
    assert!(
        call.status.success(),
        "call failed: {printed}\n{}",
        String::from_utf8_lossy(&call.stderr)
    );
    assert!(printed.contains("agent audio"), "{printed}");
    assert!(
        printed.contains("voxrelay_uplink_added_seconds"),
        "{printed}"
    );

    // A wrong token is refused by the bridge.
    let refused = clean_command(&[
        "call",
        "--to",
        &format!("http://{listen}"),
        "--linger-seconds",
        "0",
    ])
    .env("TWILIO_AUTH_TOKEN", "not-the-token")
    .output()
    .unwrap();
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("403"));

    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let began = Instant::now();
    let status = loop {
        if let Some(status) = server.try_wait().unwrap() {
            break status;
        }
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "serve exited with {status}");
    let mut rest = Vec::new();
    while let Ok(line) = lines_rx.recv_timeout(Duration::from_millis(500)) {
        rest.push(line);
    }
    assert!(rest.iter().any(|l| l.contains("SIGTERM")), "{rest:#?}");
    let all = seen
        .iter()
        .chain(&rest)
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !all.contains("cli-test-token"),
        "the auth token reached the log"
    );
}

#[test]
fn serve_mirrors_the_listener_limits_as_flags() {
    let output = clean_command(&["serve", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for (flag, env) in [
        ("--admin-listen", "VOXRELAY_ADMIN_LISTEN"),
        ("--max-calls", "VOXRELAY_MAX_CALLS"),
        ("--max-connections", "VOXRELAY_MAX_CONNECTIONS"),
        (
            "--max-unverified-connections",
            "VOXRELAY_MAX_UNVERIFIED_CONNECTIONS",
        ),
    ] {
        assert!(help.contains(flag) && help.contains(env), "{flag}: {help}");
    }
    assert!(help.contains("127.0.0.1:9091"), "{help}");
    let call = clean_command(&["call", "--help"]).output().unwrap();
    assert!(String::from_utf8_lossy(&call.stdout).contains("--admin-url"));
}
