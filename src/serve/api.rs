//! OpenAI chat-completions wire types (the subset we serve) and how a request becomes a prompt.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::generate::{Sampling, MAX_IMAGES};
use crate::text::IMAGE_TAG;

/// `POST /v1/chat/completions` body. A parameter this server does not implement is refused by
/// name (as OpenAI refuses an unrecognised one) unless it is at the value that asks for nothing
/// (`n = 1`, `logprobs = false`, penalties 0, ...); see [`check_extra`].
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: bool,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    /// Extension (upstream samples with top-k 8).
    pub top_k: Option<usize>,
    /// Extension: upstream's repetition penalty (divides the logits of seen tokens).
    pub repetition_penalty: Option<f64>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub seed: Option<u64>,
    /// Up to 4 strings; the answer ends before the first of them (not included).
    pub stop: Option<Stop>,
    pub stream_options: Option<StreamOptions>,
    /// Everything else the client sent, checked by [`check_extra`].
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Most stop sequences a request may give (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// OpenAI parameters that change nothing here: accepted and ignored.
const IGNORED: &[&str] = &[
    "user",
    "metadata",
    "store",
    "service_tier",
    "parallel_tool_calls",
];

/// Parameters this server does not implement: accepted only at the value that asks for nothing,
/// otherwise a 400 naming the parameter. Any other parameter is refused as unrecognised.
fn check_extra(extra: &serde_json::Map<String, serde_json::Value>) -> Result<(), ApiError> {
    use serde_json::Value;
    for (key, value) in extra {
        let harmless = match key.as_str() {
            k if IGNORED.contains(&k) => true,
            "n" => value.as_u64() == Some(1),
            "logprobs" => matches!(value, Value::Bool(false)),
            "presence_penalty" | "frequency_penalty" => value.as_f64() == Some(0.0),
            "logit_bias" => value.as_object().is_some_and(|m| m.is_empty()),
            "response_format" => value.get("type").and_then(Value::as_str) == Some("text"),
            "top_logprobs" | "tools" | "tool_choice" | "functions" | "function_call"
            | "modalities" | "audio" | "prediction" | "reasoning_effort" => value.is_null(),
            _ => {
                return Err(ApiError::bad(
                    "unsupported_parameter",
                    format!("unrecognised parameter {key:?}"),
                ))
            }
        };
        if !harmless {
            return Err(ApiError::bad(
                "unsupported_parameter",
                format!("parameter {key:?} = {value} is not supported by this server"),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: Content,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
}

#[derive(Debug, Deserialize)]
pub struct ImageUrl {
    pub url: String,
}

/// A client error: HTTP status + OpenAI-style `{"error": {...}}` body.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            code,
            message: message.into(),
        }
    }

    pub fn body(&self) -> serde_json::Value {
        let kind = if self.status >= 500 {
            "server_error"
        } else {
            "invalid_request_error"
        };
        serde_json::json!({"error": {"message": self.message, "type": kind, "code": self.code}})
    }
}

/// What the request asks for, before tokenisation: the rendered chat text (images as `<image>`
/// tags), the encoded image files in order, and the sampling settings.
#[derive(Debug)]
pub struct Parsed {
    pub text: String,
    pub images: Vec<Vec<u8>>,
    pub sampling: Sampling,
    pub max_tokens: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    pub stop: Vec<String>,
}

/// Render messages with upstream's chat template (`tokenizer_config.json`): an optional leading
/// system message verbatim, `<s>user\n{c}</s>\n<s>assistant\n` per user turn, `{c}</s>\n` per
/// assistant turn. Image parts become `<image>` tags where they appear, parts joined by `\n`.
pub fn parse(req: ChatRequest) -> Result<Parsed, ApiError> {
    check_extra(&req.extra)?;
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(ApiError::bad(
            "bad_stop",
            format!("stop takes 1 to {MAX_STOP} non-empty strings"),
        ));
    }
    if req.stream_options.is_some() && !req.stream {
        return Err(ApiError::bad(
            "bad_stream_options",
            "stream_options is only allowed with stream = true",
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::bad("no_messages", "messages is empty"));
    }
    if req.messages.last().map(|m| m.role.as_str()) != Some("user") {
        return Err(ApiError::bad(
            "last_message_not_user",
            "the last message must have role \"user\"",
        ));
    }
    let mut text = String::new();
    let mut images = Vec::new();
    for (i, m) in req.messages.into_iter().enumerate() {
        let content = match m.content {
            Content::Text(t) => check_text(t)?,
            Content::Parts(parts) => {
                let mut pieces = Vec::new();
                for p in parts {
                    match p {
                        Part::Text { text } => pieces.push(check_text(text)?),
                        Part::ImageUrl { image_url } => {
                            images.push(decode_data_url(&image_url.url)?);
                            pieces.push(IMAGE_TAG.to_string());
                        }
                    }
                }
                pieces.join("\n")
            }
        };
        match m.role.as_str() {
            "system" if i == 0 => text.push_str(&content),
            "user" => text.push_str(&format!("<s>user\n{content}</s>\n<s>assistant\n")),
            "assistant" => text.push_str(&format!("{content}</s>\n")),
            other => {
                return Err(ApiError::bad(
                    "bad_role",
                    format!(
                    "message {i}: role {other:?} (expected a leading system, then user/assistant)"
                ),
                ))
            }
        }
    }
    if images.len() > MAX_IMAGES {
        return Err(ApiError::bad(
            "too_many_images",
            format!(
                "{} images; the model was trained with at most {MAX_IMAGES}",
                images.len()
            ),
        ));
    }
    let mut sampling = crate::generate::Sampling::upstream_chat();
    sampling.temperature = req.temperature.unwrap_or(sampling.temperature);
    sampling.top_p = req.top_p.or(sampling.top_p);
    sampling.top_k = req.top_k.or(sampling.top_k);
    sampling.repetition_penalty = req
        .repetition_penalty
        .unwrap_or(sampling.repetition_penalty);
    sampling.seed = req.seed.unwrap_or(sampling.seed);
    sampling.validate().map_err(|(setting, message)| {
        let code = match setting {
            "temperature" => "bad_temperature",
            "top_p" => "bad_top_p",
            "repetition_penalty" => "bad_repetition_penalty",
            _ => "bad_max_tokens",
        };
        ApiError::bad(code, message)
    })?;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    if max_tokens == Some(0) {
        return Err(ApiError::bad("bad_max_tokens", "max_tokens must be ≥ 1"));
    }
    Ok(Parsed {
        text,
        images,
        sampling,
        max_tokens,
        stream: req.stream,
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
        stop,
    })
}

/// Images come only from `image_url` parts; a literal tag in text would be ambiguous.
fn check_text(t: String) -> Result<String, ApiError> {
    if t.contains(IMAGE_TAG) {
        return Err(ApiError::bad(
            "image_tag_in_text",
            "text contains \"<image>\": send images as image_url parts, they are placed where they appear",
        ));
    }
    Ok(t)
}

/// `data:image/...;base64,...` → bytes. Remote URLs are refused: the server fetches nothing.
pub fn decode_data_url(url: &str) -> Result<Vec<u8>, ApiError> {
    let Some(rest) = url.strip_prefix("data:") else {
        return Err(ApiError::bad(
            "unsupported_image_url",
            "only data: URLs are accepted (data:image/png;base64,...); the server does not fetch remote images",
        ));
    };
    let Some((head, payload)) = rest.split_once(',') else {
        return Err(ApiError::bad("bad_data_url", "data URL without a comma"));
    };
    if !head.ends_with(";base64") {
        return Err(ApiError::bad("bad_data_url", "data URL must be base64"));
    }
    base64::engine::general_purpose::STANDARD
        .decode(payload.trim())
        .map_err(|e| ApiError::bad("bad_data_url", format!("base64: {e}")))
}

#[derive(Debug, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

pub fn completion(
    id: &str,
    model: &str,
    created: u64,
    text: &str,
    finish: &str,
    usage: Usage,
) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish,
        }],
        "usage": usage,
    })
}

pub fn chunk(
    id: &str,
    model: &str,
    created: u64,
    delta: serde_json::Value,
    finish: Option<&str>,
) -> serde_json::Value {
    serde_json::json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    })
}
