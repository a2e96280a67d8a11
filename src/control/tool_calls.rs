//! Tool calls: when the model calls a function, the bridge runs it on the control plane
//! (`POST /v1/tools/{name}`) and hands the model the text to answer with.
//!
//! [`run_tool`] owns the rule that a tool can fail but the call goes on: it never returns an
//! error, only the text for the model's `function_call_output`. That is the control plane's
//! `output` on success ([`ToolResponse::output_text`]: a string verbatim, other JSON
//! serialised), or a small JSON error object, `{"error":"tool_failed","detail":"…"}`, when the
//! arguments are not JSON, the tool does not answer within its timeout, the control plane
//! cannot be reached, answers non-2xx or answers something unreadable. The detail is one of a
//! few fixed sentences (plus the HTTP status and the answer's short `error` code): no URL,
//! header, secret or raw body reaches the model. Each failure is logged with the call SID.
//!
//! Metrics: `voxrelay_control_tool_calls_total` counts every call, and
//! `voxrelay_control_tool_failures_total` those answered with an error object.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::control::api::{ToolRequest, ToolResponse};
use crate::control::client::{ControlError, ControlPlaneClient};

/// A suggested tool timeout: the caller hears silence while the tool runs.
pub const DEFAULT_TOOL_TIMEOUT: Duration = Duration::from_secs(5);

/// The error code of every failed tool output.
pub const TOOL_FAILED: &str = "tool_failed";

/// Runs tool `name` for a call and returns the text for the model (see the module docs). An
/// empty `arguments_json` counts as `{}`. Waits at most `timeout` (and the client's own request
/// timeout, whichever is shorter).
pub async fn run_tool(
    client: &ControlPlaneClient,
    name: &str,
    call_sid: &str,
    tenant_id: &str,
    arguments_json: &str,
    timeout: Duration,
) -> String {
    let metrics = client.metrics();
    metrics.control_tool_calls.fetch_add(1, Relaxed);
    let result = call(client, name, call_sid, tenant_id, arguments_json, timeout).await;
    match result {
        Ok(response) => response.output_text(),
        Err(failure) => {
            metrics.control_tool_failures.fetch_add(1, Relaxed);
            tracing::warn!(call_sid, tool = name, "tool call failed: {failure}");
            failure.output()
        }
    }
}

async fn call(
    client: &ControlPlaneClient,
    name: &str,
    call_sid: &str,
    tenant_id: &str,
    arguments_json: &str,
    timeout: Duration,
) -> Result<ToolResponse, ToolFailure> {
    let arguments = if arguments_json.trim().is_empty() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_str(arguments_json).map_err(|_| ToolFailure::InvalidArguments)?
    };
    let request = ToolRequest {
        call_sid: call_sid.to_owned(),
        tenant_id: tenant_id.to_owned(),
        arguments,
    };
    match tokio::time::timeout(timeout, client.tool(name, &request)).await {
        Ok(result) => result.map_err(ToolFailure::Control),
        Err(_) => Err(ToolFailure::Timeout(timeout)),
    }
}

/// Why a tool call produced an error output.
#[derive(Debug)]
enum ToolFailure {
    InvalidArguments,
    Timeout(Duration),
    Control(ControlError),
}

impl std::fmt::Display for ToolFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ToolFailure::InvalidArguments => f.write_str("the model's arguments are not JSON"),
            ToolFailure::Timeout(timeout) => write!(f, "no answer within {timeout:?}"),
            ToolFailure::Control(error) => write!(f, "{error}"),
        }
    }
}

impl ToolFailure {
    /// The model-facing sentence: fixed wording, nothing from a URL, header or raw body.
    fn detail(&self) -> String {
        match self {
            ToolFailure::InvalidArguments => "the arguments are not valid JSON".to_owned(),
            ToolFailure::Timeout(timeout)
            | ToolFailure::Control(ControlError::Timeout(timeout)) => {
                format!("the tool did not answer within {} ms", timeout.as_millis())
            }
            ToolFailure::Control(ControlError::Status { status, code }) => match code {
                Some(code) => format!("the tool service refused the call (HTTP {status}, {code})"),
                None => format!("the tool service refused the call (HTTP {status})"),
            },
            ToolFailure::Control(ControlError::Transport(_)) => {
                "the tool service could not be reached".to_owned()
            }
            ToolFailure::Control(_) => "the tool service sent an unreadable answer".to_owned(),
        }
    }

    fn output(&self) -> String {
        serde_json::json!({ "error": TOOL_FAILED, "detail": self.detail() }).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(failure: ToolFailure) -> serde_json::Value {
        serde_json::from_str(&failure.output()).unwrap()
    }

    #[test]
    fn every_failure_becomes_a_fixed_json_error_object() {
        let cases = [
            (
                ToolFailure::InvalidArguments,
                "the arguments are not valid JSON",
            ),
            (
                ToolFailure::Timeout(Duration::from_millis(1500)),
                "the tool did not answer within 1500 ms",
            ),
            (
                ToolFailure::Control(ControlError::Timeout(Duration::from_secs(5))),
                "the tool did not answer within 5000 ms",
            ),
            (
                ToolFailure::Control(ControlError::Status {
                    status: 404,
                    code: Some("unknown_tool".into()),
                }),
                "the tool service refused the call (HTTP 404, unknown_tool)",
            ),
            (
                ToolFailure::Control(ControlError::Status {
                    status: 502,
                    code: None,
                }),
                "the tool service refused the call (HTTP 502)",
            ),
            (
                ToolFailure::Control(ControlError::Transport(
                    "client error (Connect): tcp connect error: 10.0.0.7:8443 refused".into(),
                )),
                "the tool service could not be reached",
            ),
            (
                ToolFailure::Control(ControlError::Decode("expected `output` at 1:2".into())),
                "the tool service sent an unreadable answer",
            ),
            (
                ToolFailure::Control(ControlError::BodyTooLarge { limit: 1 }),
                "the tool service sent an unreadable answer",
            ),
        ];
        for (failure, detail) in cases {
            let value = output(failure);
            assert_eq!(value["error"], "tool_failed");
            assert_eq!(value["detail"], detail);
            assert_eq!(value.as_object().unwrap().len(), 2);
        }
    }
}
