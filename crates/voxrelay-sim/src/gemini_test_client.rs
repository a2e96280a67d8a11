//! The raw Gemini Live client the simulator's own tests dial its models with (the mock's and
//! the echo model's Gemini side): a handshake with chosen headers, and the next message or
//! the close code, each step bounded.

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

pub(crate) type Client =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Generous per-step bound: a loaded CI machine is slow, a hang still fails.
const STEP: Duration = Duration::from_secs(5);

/// Opens `url` with `headers` (e.g. `x-goog-api-key`).
pub(crate) async fn dial_gemini(
    url: &str,
    headers: &[(&'static str, &str)],
) -> Result<Client, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    for (name, value) in headers {
        request
            .headers_mut()
            .insert(*name, HeaderValue::from_str(value).expect("header"));
    }
    let (socket, _) = tokio::time::timeout(STEP, tokio_tungstenite::connect_async(request))
        .await
        .expect("handshake in time")?;
    Ok(socket)
}

/// The next Gemini message (they carry no event id), or the close code if the server closed.
pub(crate) async fn next_gemini(client: &mut Client) -> Result<Value, Option<u16>> {
    loop {
        let message = tokio::time::timeout(STEP, client.next())
            .await
            .expect("message in time");
        match message {
            Some(Ok(Message::Text(text))) => {
                return Ok(serde_json::from_str(text.as_str()).expect("server JSON"));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(frame.map(|frame| u16::from(frame.code)));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Err(None),
        }
    }
}
