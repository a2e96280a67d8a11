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
        .env_remove("VOXRELAY_PROVIDER")
        .env_remove("GEMINI_API_KEY")
        .env_remove("VOXRELAY_GEMINI_URL")
        .env_remove("VOXRELAY_CONTROL_PLANE_URL")
        .env_remove("VOXRELAY_TWILIO_ACCOUNT_SID")
        .env_remove("VOXRELAY_RECORD")
        .env_remove("VOXRELAY_RECORDING_DIR")
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

/// A build that cannot record refuses `VOXRELAY_RECORD=1` rather than run unrecorded.
#[cfg(not(feature = "opus"))]
#[test]
fn serve_refuses_to_record_on_a_build_without_opus() {
    let reason = serve_refusal(&base_with(None, &[("VOXRELAY_RECORD", "1")]));
    assert!(
        reason.contains("VOXRELAY_RECORD=1") && reason.contains("--features opus"),
        "{reason}"
    );
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
    // The default provider's key is the one required.
    let reason = serve_refusal(&base_with(None, &[("VOXRELAY_PROVIDER", "gemini")]));
    assert!(
        reason.contains("GEMINI_API_KEY is not set") && reason.contains("--mock-model"),
        "{reason}"
    );
    let reason = serve_refusal(&base_with(
        None,
        &[
            ("GEMINI_API_KEY", "gemini-cli-secret"),
            ("VOXRELAY_GEMINI_URL", "ws://10.0.0.5:9000/live"),
        ],
    ));
    assert!(reason.contains("VOXRELAY_GEMINI_URL"), "{reason}");
    assert!(!reason.contains("gemini-cli-secret"), "{reason}");
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

// ---- SIGTERM with a call in flight: its report is delivered or spooled, never lost ----

mod drain {
    use std::io::{BufRead, BufReader};
    use std::net::SocketAddr;
    use std::process::{Child, Command, Stdio};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use base64::Engine as _;
    use futures_util::{SinkExt, StreamExt};
    use serde_json::json;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpSocket, TcpStream};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use url::Url;
    use voxrelay::control::signing::Verifier;
    use voxrelay::twilio::signature::compute_signature;
    use voxrelay_control_plane::seed::SeedSource;
    use voxrelay_control_plane::server::{ControlPlane, ControlPlaneConfig, RunningControlPlane};
    use voxrelay_control_plane::store::DbLocation;
    use voxrelay_sim::mock::{MockConfig, MockRealtimeServer};

    use super::{BIN, free_port};

    const AUTH_TOKEN: &str = "cli-drain-token";
    const CP_KEY_ID: &str = "cli-bridge";
    const CP_SECRET: &str = "cli-drain-secret";
    const ACME: &str = "+15550100001";
    /// Receive buffers this small make a peer that stops reading stall its sender quickly.
    const SMALL_BUFFER: u32 = 4096;

    /// Kills the child however the test ends.
    struct KillOnDrop(Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A fresh directory under the system's temp dir, removed when dropped.
    struct Scratch(std::path::PathBuf);

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A TCP proxy in front of the mock model that, once stalled, stops reading what the
    /// bridge sends: the model "stops reading" without the mock knowing.
    struct StallingProxy {
        addr: SocketAddr,
        stalled: Arc<AtomicBool>,
    }

    impl StallingProxy {
        async fn start(upstream: SocketAddr) -> Self {
            let socket = TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(SMALL_BUFFER).unwrap();
            socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let listener: TcpListener = socket.listen(64).unwrap();
            let addr = listener.local_addr().unwrap();
            let stalled = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stalled);
            tokio::spawn(async move {
                while let Ok((bridge, _)) = listener.accept().await {
                    let Ok(model) = TcpStream::connect(upstream).await else {
                        continue;
                    };
                    let (mut from_bridge, mut to_bridge) = bridge.into_split();
                    let (mut from_model, mut to_model) = model.into_split();
                    let flag = Arc::clone(&flag);
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 16 * 1024];
                        loop {
                            if flag.load(Ordering::SeqCst) {
                                // Hold both halves and never read again.
                                std::future::pending::<()>().await;
                            }
                            match tokio::time::timeout(
                                Duration::from_millis(20),
                                from_bridge.read(&mut buf),
                            )
                            .await
                            {
                                Err(_) => continue,
                                Ok(Ok(0)) | Ok(Err(_)) => return,
                                Ok(Ok(n)) => {
                                    if to_model.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut from_model, &mut to_bridge).await;
                    });
                }
            });
            Self { addr, stalled }
        }

        fn stall(&self) {
            self.stalled.store(true, Ordering::SeqCst);
        }
    }

    async fn control_plane(db: &std::path::Path) -> RunningControlPlane {
        ControlPlane::start(ControlPlaneConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            db: DbLocation::File(db.to_path_buf()),
            seed: Some(SeedSource::shipped()),
            verifier: Verifier::from_key_list(&format!("{CP_KEY_ID}:{CP_SECRET}")).unwrap(),
        })
        .await
        .expect("control plane")
    }

    /// `voxrelay serve` with the control plane, the (proxied) mock model and everything
    /// production requires set; stream tokens at their default.
    fn serve(listen: &str, model: &str, cp: &Url, spool: &std::path::Path) -> KillOnDrop {
        let child = Command::new(BIN)
            .arg("serve")
            .env_remove("VOXRELAY_REQUIRE_STREAM_TOKEN")
            .env_remove("VOXRELAY_MOCK_MODEL")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env("VOXRELAY_LISTEN", listen)
            .env("VOXRELAY_ADMIN_LISTEN", "127.0.0.1:0")
            .env("VOXRELAY_PUBLIC_URL", format!("http://{listen}"))
            .env("TWILIO_AUTH_TOKEN", AUTH_TOKEN)
            .env("OPENAI_API_KEY", "test-key")
            .env("VOXRELAY_OPENAI_URL", model)
            .env("VOXRELAY_CONTROL_PLANE_URL", cp.as_str())
            .env("VOXRELAY_CONTROL_PLANE_KEY_ID", CP_KEY_ID)
            .env("VOXRELAY_CONTROL_PLANE_SECRET", CP_SECRET)
            .env("VOXRELAY_REPORT_SPOOL_DIR", spool)
            .env("VOXRELAY_DRAIN_SECONDS", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn serve");
        KillOnDrop(child)
    }

    /// Opens the Media Streams socket Twilio would, with a small receive buffer so that not
    /// reading it stalls the bridge's writer soon.
    async fn open_stream(stream_url: &str) -> tokio_tungstenite::WebSocketStream<TcpStream> {
        let url = Url::parse(stream_url).unwrap();
        let addr: SocketAddr = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap())
            .parse()
            .unwrap();
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(SMALL_BUFFER).unwrap();
        let tcp = socket.connect(addr).await.expect("connect to the bridge");
        let mut request = stream_url.into_client_request().unwrap();
        let signature = compute_signature(AUTH_TOKEN, stream_url, &[]);
        request
            .headers_mut()
            .insert("x-twilio-signature", signature.parse().unwrap());
        let (ws, _) = tokio_tungstenite::client_async(request, tcp)
            .await
            .expect("media socket");
        ws
    }

    fn start_message(stream_sid: &str, call_sid: &str, parameters: serde_json::Value) -> Message {
        Message::text(
            json!({
                "event": "start", "sequenceNumber": "1", "streamSid": stream_sid,
                "start": {
                    "accountSid": "AC00000000000000000000000000000000", "streamSid": stream_sid,
                    "callSid": call_sid, "tracks": ["inbound"], "customParameters": parameters,
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
                }
            })
            .to_string(),
        )
    }

    fn media_message(stream_sid: &str, sequence: u64, payload: &str) -> Message {
        Message::text(
            json!({
                "event": "media", "sequenceNumber": sequence.to_string(), "streamSid": stream_sid,
                "media": {"track": "inbound", "chunk": (sequence - 1).to_string(),
                          "timestamp": ((sequence - 2) * 20).to_string(), "payload": payload}
            })
            .to_string(),
        )
    }

    /// A loud 20 ms μ-law frame, base64.
    fn tone_frame() -> String {
        let frame: Vec<u8> = (0..160)
            .map(|n| if (n / 10) % 2 == 0 { 0x80 } else { 0x00 })
            .collect();
        base64::engine::general_purpose::STANDARD.encode(frame)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sigterm_with_a_call_in_flight_and_stalled_peers_delivers_its_report() {
        let scratch = Scratch(std::env::temp_dir().join(format!(
            "voxrelay-cli-drain-{}-{:x}",
            std::process::id(),
            rand::random::<u64>()
        )));
        std::fs::create_dir_all(&scratch.0).unwrap();
        let spool = scratch.0.join("spool");
        let cp = control_plane(&scratch.0.join("cp.sqlite3")).await;
        let mock = MockRealtimeServer::start(MockConfig::default())
            .await
            .expect("mock");
        let mock_url = Url::parse(&mock.url()).unwrap();
        let mock_addr: SocketAddr = format!(
            "{}:{}",
            mock_url.host_str().unwrap(),
            mock_url.port().unwrap()
        )
        .parse()
        .unwrap();
        let proxy = StallingProxy::start(mock_addr).await;
        let mut model_url = mock_url.clone();
        model_url.set_port(Some(proxy.addr.port())).unwrap();

        let listen = format!("127.0.0.1:{}", free_port());
        let mut server = serve(&listen, model_url.as_str(), &cp.url(), &spool);
        let stdout = server.0.stdout.take().unwrap();
        let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines_tx.send(line);
            }
        });
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !seen.iter().any(|l: &String| l.contains("bridge ready")) {
            assert!(
                Instant::now() < deadline,
                "serve never got ready: {seen:#?}"
            );
            if let Ok(Some(status)) = server.0.try_wait() {
                panic!("serve exited early ({status}): {seen:#?}");
            }
            while let Ok(line) = lines_rx.try_recv() {
                seen.push(line);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The default refuses a stream that did not come from the webhook.
        let stray = open_stream(&format!("ws://{listen}/twilio/media")).await;
        let (mut stray_tx, mut stray_rx) = stray.split();
        let stray_sid = format!("MZ{:032x}", rand::random::<u128>());
        let stray_call = format!("CA{:032x}", rand::random::<u128>());
        stray_tx
            .send(start_message(&stray_sid, &stray_call, json!({"To": ACME})))
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stray_rx.next().await {
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await;
        assert!(
            closed.is_ok(),
            "a stream without a token was let through by default"
        );

        // The voice webhook, signed like Twilio, for Acme's number.
        let call_sid = format!("CA{:032x}", rand::random::<u128>());
        let stream_sid = format!("MZ{:032x}", rand::random::<u128>());
        let webhook = Url::parse(&format!("http://{listen}/twilio/voice")).unwrap();
        let params: Vec<(String, String)> = [
            ("CallSid", call_sid.as_str()),
            ("AccountSid", "AC00000000000000000000000000000000"),
            ("To", ACME),
            ("From", "+15557770009"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let signature = compute_signature(AUTH_TOKEN, webhook.as_str(), &params);
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params.iter())
            .finish();
        let answer = voxrelay_sim::http_client::send(
            "POST",
            &webhook,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("x-twilio-signature", &signature),
            ],
            body.into_bytes(),
        )
        .await
        .expect("webhook");
        assert_eq!(answer.status, 200, "{}", answer.body);
        let (stream_url, parameters) =
            voxrelay_sim::caller::parse_connect_stream(&answer.body).expect("TwiML stream");
        let parameters =
            serde_json::Value::Object(parameters.into_iter().map(|(k, v)| (k, json!(v))).collect());

        // The call: live (the model hears it), then both peers stop reading while the caller
        // keeps sending audio and pings.
        let ws = open_stream(&stream_url).await;
        let (mut tx, rx) = ws.split();
        tx.send(Message::text(
            json!({"event":"connected","protocol":"Call","version":"1.0.0"}).to_string(),
        ))
        .await
        .unwrap();
        tx.send(start_message(&stream_sid, &call_sid, parameters))
            .await
            .unwrap();
        let frame = tone_frame();
        let mut sequence = 2;
        let heard = |mock: &MockRealtimeServer| {
            mock.log()
                .sessions()
                .iter()
                .any(|s| s.input_audio_8k.len() >= 8 * 200)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !heard(&mock) {
            assert!(
                Instant::now() < deadline,
                "the call never reached the model"
            );
            tx.send(media_message(&stream_sid, sequence, &frame))
                .await
                .unwrap();
            sequence += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.stall();
        // `rx` is never read again: the bridge's writes to this caller pile up.
        let flooding = tokio::spawn(async move {
            let _rx = rx;
            let ping = vec![0x5a; 125];
            loop {
                if tx
                    .send(media_message(&stream_sid, sequence, &frame))
                    .await
                    .is_err()
                    || tx.send(Message::Ping(ping.clone().into())).await.is_err()
                {
                    return;
                }
                sequence += 1;
            }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;

        // SIGTERM: drain (1 s), then the call is cancelled with both sockets stuck.
        let killed = Command::new("kill")
            .args(["-TERM", &server.0.id().to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
        let began = Instant::now();
        let status = loop {
            if let Some(status) = server.0.try_wait().unwrap() {
                break status;
            }
            assert!(
                began.elapsed() < Duration::from_secs(20),
                "serve did not stop on SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(status.success(), "serve exited with {status}");
        flooding.abort();
        while let Ok(line) = lines_rx.try_recv() {
            seen.push(line);
        }

        // The report reached the control plane, or waits in the spool: never lost.
        let store = cp.store().clone();
        let stored = store
            .call_history("acme_dental", 10)
            .unwrap()
            .unwrap()
            .calls
            .into_iter()
            .find(|call| call.call_sid == call_sid);
        let spooled = std::fs::read_dir(&spool)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|entry| entry.file_name().to_string_lossy().contains(&call_sid))
                    .count()
            })
            .unwrap_or(0);
        assert!(
            stored.is_some() || spooled == 1,
            "the call's report was lost: {seen:#?}"
        );
        if let Some(report) = stored {
            assert_eq!(report.end_reason, "shutdown");
            assert_eq!(report.tenant_id.as_deref(), Some("acme_dental"));
        }
        assert!(
            !seen
                .iter()
                .any(|l| l.contains("report is lost") || l.contains("report lost")),
            "{seen:#?}"
        );
        cp.stop().await;
        mock.shutdown();
    }
}
