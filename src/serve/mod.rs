//! `minimind-v serve`: a web page and an OpenAI-compatible chat API over one loaded model.
//!
//! A request takes a place in the bounded queue first (503 when it is full), so everything it
//! costs is bounded: its body (`max_body`, read within `body_timeout`), then its validation —
//! JSON, images decoded and resized within the image limits, text refused by its byte length
//! before it is tokenised — on at most as many threads as the machine has cores, then a single
//! generation thread that owns the model. Each job gets its own KV cache, so concurrent requests
//! never share state. The answer streams back through a channel, as server-sent events when the
//! client asks for `stream`. Every error is JSON; headers must arrive within `header_timeout`,
//! and a connection idle that long between requests is closed.

pub mod api;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use candle_core::Tensor;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::generate::stop::StopScan;
use crate::generate::{generate, Engine, Sampling, TextStream};
use crate::model::vlm::Images;
use crate::text::{placeholder_starts, ChatTokenizer, MAX_TOKEN_BYTES};
use crate::vision::preprocess::ImageLimits;
use api::{ApiError, ChatRequest, Usage};

#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted (bytes).
    pub max_body: usize,
    /// Requests in the server (being validated or waiting for the generation thread) beyond this
    /// are refused with 503.
    pub max_queue: usize,
    /// How large an image may be before it is decoded.
    pub images: ImageLimits,
    /// A request's headers must arrive within this; a connection idle for this long between
    /// requests is closed.
    pub header_timeout: Duration,
    /// A request body must arrive within this (a client that declares a length and sends less
    /// would otherwise hold its place forever).
    pub body_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body: 16 << 20,
            max_queue: 16,
            images: ImageLimits::default(),
            header_timeout: Duration::from_secs(30),
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// One queued generation.
struct Job {
    ids: Vec<u32>,
    /// Resized HWC u8 images, in prompt order.
    images: Vec<Vec<u8>>,
    sampling: Sampling,
    /// Stop sequences: the answer ends before the first.
    stop: Vec<String>,
    out: mpsc::UnboundedSender<Piece>,
    /// Held until the job is done (given back when it drops).
    _place: Place,
}

/// What the generation thread sends back for a job.
#[derive(Debug)]
enum Piece {
    Text(String),
    Done {
        finish: &'static str,
        completion_tokens: usize,
    },
    Failed(String),
}

struct AppState {
    jobs: crossbeam_channel::Sender<Job>,
    queued: Arc<AtomicUsize>,
    tokenizer: Arc<ChatTokenizer>,
    model_id: String,
    clip_id: Option<String>,
    clip_random: bool,
    /// The tower's dtype: "f32", or "f16" for a model trained on f16 features.
    clip_dtype: Option<String>,
    image_size: Option<u32>,
    max_seq_len: usize,
    limits: Limits,
    next_id: AtomicU64,
    /// Validations (decoding, tokenising) running at once.
    validating: tokio::sync::Semaphore,
}

/// Build the router and start the generation thread that owns `engine`.
pub fn app(engine: Engine, limits: Limits) -> Router {
    let (tx, rx) = crossbeam_channel::bounded::<Job>(limits.max_queue);
    let state = Arc::new(AppState {
        jobs: tx,
        queued: Arc::new(AtomicUsize::new(0)),
        tokenizer: engine.tokenizer.clone(),
        model_id: engine.model_id.clone(),
        clip_id: engine.tower.as_ref().map(|t| t.source.to_string()),
        clip_random: engine.tower.as_ref().is_some_and(|t| t.is_random()),
        clip_dtype: engine.tower.as_ref().map(|t| t.dtype.as_str().to_string()),
        image_size: engine.tower.as_ref().map(|t| t.image_size as u32),
        max_seq_len: engine.vlm.cfg.max_seq_len,
        limits,
        next_id: AtomicU64::new(0),
        validating: tokio::sync::Semaphore::new(crate::train::dist::cpu_cores()),
    });
    std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || {
            for job in rx {
                run_job(&engine, job);
            }
        })
        .expect("spawning the generation thread");
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(completions))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

fn run_job(engine: &Engine, job: Job) {
    let result = (|| -> crate::error::Result<(&'static str, usize)> {
        let images = match (&engine.tower, job.images.is_empty()) {
            (_, true) => None,
            (Some(tower), false) => {
                let refs: Vec<&[u8]> = job.images.iter().map(|v| v.as_slice()).collect();
                let feats: Tensor = tower.features_u8(&refs)?;
                Images::for_rows(&[&job.ids], &[feats], &engine.vlm.cfg.image_ids)?
            }
            (None, false) => unreachable!("requests with images are refused without a tower"),
        };
        let mut text = TextStream::new(&engine.tokenizer);
        let mut scan = StopScan::new(job.stop.clone());
        let (mut gone, mut stopped) = (false, false);
        // False when the client has gone.
        let send = |piece: String| piece.is_empty() || job.out.send(Piece::Text(piece)).is_ok();
        let out = generate(
            &engine.vlm,
            &job.ids,
            images.as_ref(),
            &job.sampling,
            true,
            |t| {
                if let Some(piece) = text.push(t) {
                    let (shown, stop) = scan.push(&piece);
                    gone = !send(shown);
                    stopped = stop;
                }
                !gone && !stopped
            },
        )?;
        if !stopped {
            send(scan.finish());
        }
        let hit_limit = out.len() >= job.sampling.max_new_tokens
            || job.ids.len() + out.len() >= engine.vlm.cfg.max_seq_len;
        let finish = if hit_limit && !stopped {
            "length"
        } else {
            "stop"
        };
        Ok((finish, out.len()))
    })();
    let last = match result {
        Ok((finish, completion_tokens)) => Piece::Done {
            finish,
            completion_tokens,
        },
        Err(e) => Piece::Failed(format!("{e:#}")),
    };
    let _ = job.out.send(last);
}

fn error(e: ApiError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(e.body())).into_response()
}

async fn not_found() -> Response {
    error(ApiError {
        status: 404,
        code: "not_found",
        message: "no such endpoint; see GET /, /health, /v1/models, POST /v1/chat/completions"
            .into(),
    })
}

async fn method_not_allowed() -> Response {
    error(ApiError {
        status: 405,
        code: "method_not_allowed",
        message: "this endpoint takes another method; see GET /, /health, /v1/models, POST /v1/chat/completions".into(),
    })
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

async fn health(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "model": st.model_id,
        "clip": st.clip_id,
        "clip_random": st.clip_random,
        "clip_dtype": st.clip_dtype,
        "queued": st.queued.load(Ordering::SeqCst),
        "max_seq_len": st.max_seq_len,
    }))
}

async fn models(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "object": "list",
        "data": [{"id": st.model_id, "object": "model", "created": 0, "owned_by": "minimind-v"}],
    }))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Validated, tokenised request, ready to queue.
struct Prepared {
    ids: Vec<u32>,
    images: Vec<Vec<u8>>,
    sampling: Sampling,
    stream: bool,
    include_usage: bool,
    stop: Vec<String>,
}

fn prepare(st: &AppState, body: &[u8]) -> Result<Prepared, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad("malformed_json", format!("request body: {e}")))?;
    let parsed = api::parse(req)?;
    let mut images = Vec::with_capacity(parsed.images.len());
    if !parsed.images.is_empty() {
        let Some(size) = st.image_size else {
            return Err(ApiError::bad(
                "images_unsupported",
                "this server was started without a CLIP tower (--clip) and cannot take images",
            ));
        };
        for (i, bytes) in parsed.images.iter().enumerate() {
            let img = crate::vision::preprocess::load_resized(bytes, size, &st.limits.images)
                .map_err(|(_, d)| {
                    ApiError::bad(
                        "not_an_image",
                        format!("image {}: not a readable image: {d}", i + 1),
                    )
                })?;
            images.push(img);
        }
    }
    // Refused by its byte length before it is tokenised: more bytes than max_seq_len tokens can
    // hold cannot fit, and tokenising megabytes costs time and memory.
    if parsed.text.len() > st.max_seq_len * MAX_TOKEN_BYTES {
        return Err(ApiError::bad(
            "prompt_too_long",
            format!(
                "the prompt is {} bytes, more than the model's max_seq_len of {} tokens can hold",
                parsed.text.len(),
                st.max_seq_len
            ),
        ));
    }
    let ids = st
        .tokenizer
        .encode_text(&crate::text::render_placeholders(&parsed.text));
    let windows = placeholder_starts(&ids).len();
    if windows != images.len() {
        return Err(ApiError::bad(
            "image_placement",
            format!(
                "{} images but {windows} image slots after tokenisation; put image parts at the start of a line or after text",
                images.len()
            ),
        ));
    }
    if ids.len() >= st.max_seq_len {
        return Err(ApiError::bad(
            "prompt_too_long",
            format!(
                "the prompt is {} tokens (each image takes 50); the model's max_seq_len is {}",
                ids.len(),
                st.max_seq_len
            ),
        ));
    }
    let mut sampling = parsed.sampling;
    sampling.max_new_tokens = parsed
        .max_tokens
        .unwrap_or(st.max_seq_len)
        .min(st.max_seq_len - ids.len());
    Ok(Prepared {
        ids,
        images,
        sampling,
        stream: parsed.stream,
        include_usage: parsed.include_usage,
        stop: parsed.stop,
    })
}

/// A place in the server: taken before the request costs anything, given back when its job
/// leaves the generation thread (or when the request fails before that).
struct Place(Arc<AtomicUsize>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn queue_full(st: &AppState) -> Response {
    error(ApiError {
        status: 503,
        code: "queue_full",
        message: format!(
            "{} requests are already in the server; try again shortly",
            st.limits.max_queue
        ),
    })
}

async fn completions(State(st): State<Arc<AppState>>, body: Body) -> Response {
    if st.queued.fetch_add(1, Ordering::SeqCst) >= st.limits.max_queue {
        st.queued.fetch_sub(1, Ordering::SeqCst);
        return queue_full(&st);
    }
    let place = Place(st.queued.clone());
    let read = axum::body::to_bytes(body, st.limits.max_body);
    let bytes = match tokio::time::timeout(st.limits.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return error(ApiError {
                status: 413,
                code: "body_too_large",
                message: format!(
                    "request body over {} bytes (start the server with a larger --max-body-mb)",
                    st.limits.max_body
                ),
            })
        }
        Err(_) => {
            return error(ApiError {
                status: 408,
                code: "body_timeout",
                message: format!(
                    "the request body did not arrive within {} s",
                    st.limits.body_timeout.as_secs_f64()
                ),
            })
        }
    };
    let Ok(permit) = st.validating.acquire().await else {
        return queue_full(&st);
    };
    let st2 = st.clone();
    let prepared = tokio::task::spawn_blocking(move || prepare(&st2, &bytes)).await;
    drop(permit);
    let prepared = match prepared {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return error(e),
        Err(e) => {
            return error(ApiError {
                status: 500,
                code: "internal",
                message: e.to_string(),
            })
        }
    };
    let prompt_tokens = prepared.ids.len();
    let (tx, rx) = mpsc::unbounded_channel();
    let job = Job {
        ids: prepared.ids,
        images: prepared.images,
        sampling: prepared.sampling,
        stop: prepared.stop,
        out: tx,
        _place: place,
    };
    // The place taken above guarantees room in the channel (both hold max_queue).
    if st.jobs.try_send(job).is_err() {
        return queue_full(&st);
    }
    let id = format!("chatcmpl-{}", st.next_id.fetch_add(1, Ordering::SeqCst));
    let created = now();
    let model = st.model_id.clone();
    if prepared.stream {
        let first = api::chunk(
            &id,
            &model,
            created,
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        );
        let include_usage = prepared.include_usage;
        let events = UnboundedReceiverStream::new(rx).flat_map(move |piece| {
            let data = match piece {
                Piece::Text(t) => vec![api::chunk(
                    &id,
                    &model,
                    created,
                    serde_json::json!({"content": t}),
                    None,
                )],
                Piece::Done {
                    finish,
                    completion_tokens,
                } => {
                    let last =
                        api::chunk(&id, &model, created, serde_json::json!({}), Some(finish));
                    // OpenAI's `stream_options.include_usage`: one more chunk, with no choices.
                    let usage = include_usage.then(|| {
                        let mut c = api::chunk(&id, &model, created, serde_json::json!({}), None);
                        c["choices"] = serde_json::json!([]);
                        c["usage"] = serde_json::json!(Usage {
                            prompt_tokens,
                            completion_tokens,
                            total_tokens: prompt_tokens + completion_tokens,
                        });
                        c
                    });
                    std::iter::once(last).chain(usage).collect()
                }
                Piece::Failed(e) => {
                    vec![serde_json::json!({"error": {"message": e, "type": "server_error"}})]
                }
            };
            futures_util::stream::iter(
                data.into_iter().map(|d| {
                    Ok::<_, std::convert::Infallible>(Event::default().data(d.to_string()))
                }),
            )
        });
        let stream = futures_util::stream::iter([Ok(Event::default().data(first.to_string()))])
            .chain(events)
            .chain(futures_util::stream::iter([Ok(
                Event::default().data("[DONE]")
            )]));
        return Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response();
    }
    let mut rx = rx;
    let mut text = String::new();
    while let Some(piece) = rx.recv().await {
        match piece {
            Piece::Text(t) => text.push_str(&t),
            Piece::Done {
                finish,
                completion_tokens,
            } => {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                    total_tokens: prompt_tokens + completion_tokens,
                };
                let body = api::completion(&id, &model, created, &text, finish, usage);
                return ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response();
            }
            Piece::Failed(e) => {
                return error(ApiError {
                    status: 500,
                    code: "generation_failed",
                    message: e,
                })
            }
        }
    }
    error(ApiError {
        status: 500,
        code: "generation_failed",
        message: "the generation thread stopped".into(),
    })
}

/// Bind and serve until Ctrl-C.
pub async fn run(engine: Engine, limits: Limits, addr: &str) -> crate::error::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        crate::error::Error::Network(format!(
            "cannot listen on {addr}: {e}\nHINT: another process may hold the port; choose another with --addr host:port"
        ))
    })?;
    let local = listener
        .local_addr()
        .map_err(|e| crate::error::Error::Network(format!("{addr}: {e}")))?;
    eprintln!(
        "serving {} on http://{local}/ (OpenAI API at /v1/chat/completions); Ctrl-C stops",
        engine.model_id
    );
    let header_timeout = limits.header_timeout;
    serve_on(listener, app(engine, limits), header_timeout, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    Ok(())
}

/// Serve `app` on `listener` until `shutdown` completes: each connection HTTP/1.1, its headers
/// due within `header_timeout` (which also closes a connection idle that long between requests).
pub async fn serve_on(
    listener: tokio::net::TcpListener,
    app: Router,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // Out of file descriptors and the like: wait, then accept again.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        tokio::spawn(async move {
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}
