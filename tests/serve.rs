//! `serve` over loopback: the OpenAI-compatible API, streaming, limits and concurrency.
//! The model is the reference tiny checkpoint (upstream `.pth`) with a random CLIP tower.

mod common;

use std::net::SocketAddr;
use std::sync::OnceLock;

use base64::Engine as _;
use common::http::{self, sse_data};
use serde_json::{json, Value};

/// One server for the whole file (loading the tower takes a moment), with a 1 MiB body limit.
pub fn server() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR.get_or_init(|| {
        let engine = minimind_v::generate::Engine::load(
            &common::reference().join("tiny_llm/model.pth"),
            Some(&minimind_v::model::ModelConfig::tiny()),
            "random:1",
            Some(common::tokenizer_dir().as_path()),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let limits = minimind_v::serve::Limits {
            max_body: 1 << 20,
            max_queue: 8,
            header_timeout: std::time::Duration::from_secs(1),
            body_timeout: std::time::Duration::from_secs(1),
            ..Default::default()
        };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let timeout = limits.header_timeout;
                let app = minimind_v::serve::app(engine, limits);
                minimind_v::serve::serve_on(listener, app, timeout, std::future::pending()).await;
            });
        });
        rx.recv().unwrap()
    })
}

/// A synthetic 128×128 PNG as a data URL.
fn png_data_url(seed: u64) -> String {
    image_data_url(seed, image::ImageFormat::Png)
}

/// A synthetic 128×128 image in `format` as a data URL.
fn image_data_url(seed: u64, format: image::ImageFormat) -> String {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let scene = minimind_v::synth::draw::Scene::random(&mut rng, 128);
    let img = minimind_v::synth::draw::render(&scene, 128, &mut rng);
    let mut buf = std::io::Cursor::new(Vec::new());
    match format {
        // Lossless, so the pixels are the PNG's.
        image::ImageFormat::WebP => image::codecs::webp::WebPEncoder::new_lossless(&mut buf)
            .encode(img.as_raw(), 128, 128, image::ExtendedColorType::Rgb8)
            .unwrap(),
        _ => image::DynamicImage::ImageRgb8(img)
            .to_rgba8()
            .write_to(&mut buf, format)
            .unwrap(),
    }
    format!(
        "data:{};base64,{}",
        format.to_mime_type(),
        base64::engine::general_purpose::STANDARD.encode(buf.into_inner())
    )
}

fn ask(images: &[String], text: &str, extra: Value) -> Value {
    let mut content: Vec<Value> = images
        .iter()
        .map(|u| json!({"type": "image_url", "image_url": {"url": u}}))
        .collect();
    content.push(json!({"type": "text", "text": text}));
    let mut req = json!({"model": "tiny", "messages": [{"role": "user", "content": content}]});
    for (k, v) in extra.as_object().unwrap() {
        req[k] = v.clone();
    }
    req
}

fn content_of_stream(body: &str) -> (String, Option<String>) {
    let data = sse_data(body);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{body}");
    let mut text = String::new();
    let mut finish = None;
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        let choice = &v["choices"][0];
        if let Some(t) = choice["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    (text, finish)
}

#[test]
fn health_models_and_page() {
    let addr = server();
    let h = http::get(addr, "/health");
    assert_eq!(h.status, 200);
    let h = h.json();
    assert_eq!(h["status"], "ok");
    assert_eq!(h["clip_random"], true);
    assert_eq!(h["clip_dtype"], "f32");
    let m = http::get(addr, "/v1/models").json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "model");
    let page = http::get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("/v1/chat/completions"));
    let missing = http::get(addr, "/nope");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "not_found");
}

#[test]
fn completion_streamed_equals_completion_whole() {
    let addr = server();
    let img = png_data_url(3);
    let req = ask(
        std::slice::from_ref(&img),
        "What shape is in the image?",
        json!({"max_tokens": 12, "seed": 5}),
    );
    let whole = http::post_json(addr, "/v1/chat/completions", &req);
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json();
    assert_eq!(whole["object"], "chat.completion");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let usage = &whole["usage"];
    assert!(usage["prompt_tokens"].as_u64().unwrap() > 50, "{usage}");
    assert!(usage["completion_tokens"].as_u64().unwrap() <= 12);

    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    let mut chunks = 0;
    let streamed = http::request_streaming(
        addr,
        "POST",
        "/v1/chat/completions",
        Some(sreq.to_string().as_bytes()),
        |_| chunks += 1,
    );
    assert_eq!(streamed.status, 200);
    assert!(streamed
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let (stext, finish) = content_of_stream(&streamed.text());
    assert_eq!(stext, text, "stream and non-stream differ");
    assert_eq!(
        finish.as_deref(),
        whole["choices"][0]["finish_reason"].as_str()
    );
    // Tokens arrive as separate events, not one buffered body.
    assert!(chunks >= 3, "{chunks} chunks");
}

#[test]
fn two_concurrent_streams_do_not_disturb_each_other() {
    let addr = server();
    let reqs = [
        ask(
            &[png_data_url(1)],
            "What colour is the shape?",
            json!({"max_tokens": 20, "seed": 1, "stream": true}),
        ),
        ask(
            &[png_data_url(2), png_data_url(4)],
            "What differs between the two images?",
            json!({"max_tokens": 20, "seed": 2, "stream": true, "temperature": 1.0}),
        ),
    ];
    let run = |r: &Value| {
        let resp = http::request(
            addr,
            "POST",
            "/v1/chat/completions",
            Some(r.to_string().as_bytes()),
        );
        assert_eq!(resp.status, 200, "{}", resp.text());
        content_of_stream(&resp.text()).0
    };
    let alone: Vec<String> = reqs.iter().map(run).collect();
    let together: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = reqs.iter().map(|r| s.spawn(move || run(r))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(alone, together);
    assert_ne!(alone[0], alone[1]);
}

#[test]
fn bad_requests_get_json_errors_and_the_server_keeps_serving() {
    let addr = server();
    let cases: Vec<(Vec<u8>, u16, &str)> = vec![
        (b"{not json".to_vec(), 400, "malformed_json"),
        (
            ask(
                &["data:image/png;base64,aGVsbG8gd29ybGQ=".into()],
                "x",
                json!({}),
            )
            .to_string()
            .into_bytes(),
            400,
            "not_an_image",
        ),
        (
            ask(&["https://example.com/a.png".into()], "x", json!({}))
                .to_string()
                .into_bytes(),
            400,
            "unsupported_image_url",
        ),
        (
            ask(&vec![png_data_url(1); 3], "x", json!({}))
                .to_string()
                .into_bytes(),
            400,
            "too_many_images",
        ),
        (
            ask(
                &[png_data_url(1), png_data_url(2)],
                &"很长的问题".repeat(20),
                json!({}),
            )
            .to_string()
            .into_bytes(),
            400,
            "prompt_too_long",
        ),
        (
            ask(&[], "look: <image>", json!({}))
                .to_string()
                .into_bytes(),
            400,
            "image_tag_in_text",
        ),
        (
            json!({"messages": [{"role": "assistant", "content": "hi"}]})
                .to_string()
                .into_bytes(),
            400,
            "last_message_not_user",
        ),
        (
            ask(
                &[format!("data:image/png;base64,{}", "A".repeat(2 << 20))],
                "x",
                json!({}),
            )
            .to_string()
            .into_bytes(),
            413,
            "body_too_large",
        ),
    ];
    for (body, status, code) in cases {
        let r = http::request(addr, "POST", "/v1/chat/completions", Some(&body));
        assert_eq!(r.status, status, "{code}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert!(!v["error"]["message"].as_str().unwrap().is_empty());
        assert_eq!(http::get(addr, "/health").status, 200);
    }
    // And a good request still works afterwards.
    let ok = http::post_json(
        addr,
        "/v1/chat/completions",
        &ask(&[png_data_url(7)], "hi", json!({"max_tokens": 4})),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn unsupported_openai_parameters_are_refused_by_name_and_harmless_ones_accepted() {
    let addr = server();
    let cases = [
        (json!({"n": 2}), "unsupported_parameter", "\"n\""),
        (
            json!({"logprobs": true}),
            "unsupported_parameter",
            "logprobs",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            "unsupported_parameter",
            "response_format",
        ),
        (
            json!({"tools": [{"type": "function"}]}),
            "unsupported_parameter",
            "tools",
        ),
        (
            json!({"frobnicate": 1}),
            "unsupported_parameter",
            "frobnicate",
        ),
        (
            json!({"stop": ["a", "b", "c", "d", "e"]}),
            "bad_stop",
            "stop",
        ),
        (json!({"stop": ""}), "bad_stop", "stop"),
        (
            json!({"stream_options": {"include_usage": true}}),
            "bad_stream_options",
            "stream",
        ),
    ];
    for (extra, code, named) in cases {
        let r = http::post_json(addr, "/v1/chat/completions", &ask(&[], "hi", extra.clone()));
        assert_eq!(r.status, 400, "{extra}: {}", r.text());
        let v = r.json();
        assert_eq!(v["error"]["code"], code, "{extra}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(named),
            "{v}"
        );
    }
    let harmless = json!({"n": 1, "user": "u", "presence_penalty": 0, "logprobs": false,
        "response_format": {"type": "text"}, "max_tokens": 3});
    let r = http::post_json(addr, "/v1/chat/completions", &ask(&[], "hi", harmless));
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn stop_sequences_end_the_answer_and_usage_can_be_streamed() {
    let addr = server();
    let base = json!({"max_tokens": 16, "seed": 11, "temperature": 1.0});
    let whole = http::post_json(
        addr,
        "/v1/chat/completions",
        &ask(&[], "你好", base.clone()),
    );
    assert_eq!(whole.status, 200, "{}", whole.text());
    let whole = whole.json();
    let text = whole["choices"][0]["message"]["content"].as_str().unwrap();
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() >= 4, "answer too short to test stop: {text:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &text[..text.find(&stop).unwrap()];

    let mut req = ask(&[], "你好", base.clone());
    req["stop"] = json!([stop]);
    let cut = http::post_json(addr, "/v1/chat/completions", &req).json();
    assert_eq!(
        cut["choices"][0]["message"]["content"], expected,
        "stop {stop:?}"
    );
    assert_eq!(cut["choices"][0]["finish_reason"], "stop");

    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let body = http::post_json(addr, "/v1/chat/completions", &req).text();
    let (streamed, finish) = content_of_stream(&body);
    assert_eq!(streamed, expected);
    assert_eq!(finish.as_deref(), Some("stop"));
    let data = sse_data(&body);
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(
        last["usage"]["prompt_tokens"], cut["usage"]["prompt_tokens"],
        "{last}"
    );
    assert_eq!(
        last["usage"]["completion_tokens"],
        cut["usage"]["completion_tokens"]
    );
    // Without include_usage, no usage chunk.
    req["stream_options"] = json!({"include_usage": false});
    let body = http::post_json(addr, "/v1/chat/completions", &req).text();
    assert!(!body.contains("\"usage\""), "{body}");
}

#[test]
fn webp_and_gif_images_are_accepted() {
    let addr = server();
    let answer = |url: String| {
        let r = http::post_json(
            addr,
            "/v1/chat/completions",
            &ask(
                &[url],
                "What shape is in the image?",
                json!({"max_tokens": 8, "seed": 2}),
            ),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["message"]["content"].clone()
    };
    let png = answer(png_data_url(4));
    // Lossless WebP holds the same pixels: the same answer.
    assert_eq!(answer(image_data_url(4, image::ImageFormat::WebP)), png);
    answer(image_data_url(4, image::ImageFormat::Gif));
}

#[test]
fn multi_turn_uses_upstream_template_and_text_only_works() {
    let addr = server();
    let req = json!({
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": "how are you?"},
        ],
        "max_tokens": 4,
        "temperature": 0,
    });
    let r = http::post_json(addr, "/v1/chat/completions", &req);
    assert_eq!(r.status, 200, "{}", r.text());
    // upstream's template: "You are helpful.<s>user\nhello</s>\n<s>assistant\nhi</s>\n<s>user\nhow are you?</s>\n<s>assistant\n"
    let tok = minimind_v::text::ChatTokenizer::load(&common::tokenizer_dir()).unwrap();
    let expect = tok.encode_text(
        "You are helpful.<s>user\nhello</s>\n<s>assistant\nhi</s>\n<s>user\nhow are you?</s>\n<s>assistant\n",
    );
    assert_eq!(
        r.json()["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        expect.len()
    );
}

/// A WebDriver session on headless Chromium (Debian `chromium` + `chromium-driver`).
struct Browser {
    driver: std::process::Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    fn start() -> Option<Self> {
        let driver_bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists());
        let Some(driver_bin) = driver_bin else {
            assert!(
                std::env::var("MMV_BROWSER_TEST").as_deref() != Ok("require"),
                "MMV_BROWSER_TEST=require but chromedriver is not installed (apt-get install chromium chromium-driver)"
            );
            eprintln!("SKIPPED: no chromedriver (apt-get install chromium chromium-driver); .ci/run requires it");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = std::process::Command::new(driver_bin)
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(t0.elapsed().as_secs() < 20, "chromedriver did not start");
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--window-size=900,1000"],
            },
        }}});
        let r = http::post_json(addr, "/session", &caps).json();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        Some(Self {
            driver,
            addr,
            session,
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let body = body.map(|b| b.to_string());
        let r = http::request(self.addr, method, &path, body.as_deref().map(str::as_bytes));
        assert_eq!(r.status, 200, "{method} {path}: {}", r.text());
        r.json()["value"].clone()
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({"using": "css selector", "value": css})),
        );
        v.as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http::request(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// The web page in a real browser: upload an image, ask, watch the answer stream in; the text
/// shown is exactly what the API answers for the same request. Saves a screenshot.
#[test]
fn web_page_in_headless_chromium() {
    let addr = server();
    let Some(b) = Browser::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let png_path = dir.path().join("shape.png");
    let url = png_data_url(11);
    let png = base64::engine::general_purpose::STANDARD
        .decode(url.split_once(',').unwrap().1)
        .unwrap();
    std::fs::write(&png_path, &png).unwrap();

    b.call(
        "POST",
        "/url",
        Some(json!({"url": format!("http://{addr}/")})),
    );
    let file = b.element("#image1");
    b.call(
        "POST",
        &format!("/element/{file}/value"),
        Some(json!({"text": png_path.to_str().unwrap()})),
    );
    let q = b.element("#question");
    b.call("POST", &format!("/element/{q}/clear"), Some(json!({})));
    let question = "What colour is the shape?";
    b.call(
        "POST",
        &format!("/element/{q}/value"),
        Some(json!({"text": question})),
    );
    let send = b.element("#send");
    let answer = b.element("#answer");
    b.call("POST", &format!("/element/{send}/click"), Some(json!({})));
    let t0 = std::time::Instant::now();
    let mut seen = Vec::new();
    let text = loop {
        let t = b.call("GET", &format!("/element/{answer}/text"), None);
        let t = t.as_str().unwrap().to_string();
        if seen.last() != Some(&t) {
            seen.push(t.clone());
        }
        let finished = b.call(
            "GET",
            &format!("/element/{answer}/attribute/data-finish"),
            None,
        );
        if finished.is_string() {
            // The page sets data-finish after appending the last piece; the text read above may
            // predate both, so read it again.
            let t = b.call("GET", &format!("/element/{answer}/text"), None);
            break t.as_str().unwrap().to_string();
        }
        let err = b.call(
            "GET",
            &format!("/element/{}/text", b.element("#error")),
            None,
        );
        assert_eq!(err, "", "page shows an error");
        assert!(
            t0.elapsed().as_secs() < 60,
            "no answer within 60 s; seen {seen:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let shot = b.call("GET", "/screenshot", None);
    let shot = base64::engine::general_purpose::STANDARD
        .decode(shot.as_str().unwrap())
        .unwrap();
    let out = common::repo().join("target/serve-screenshot.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, shot).unwrap();
    eprintln!(
        "screenshot: {} (text states seen: {})",
        out.display(),
        seen.len()
    );

    // The same request through the API, without streaming.
    let api = http::post_json(
        addr,
        "/v1/chat/completions",
        &ask(&[url], question, json!({})),
    );
    assert_eq!(api.status, 200, "{}", api.text());
    let expected = api.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(!text.trim().is_empty());
    assert_eq!(text.trim(), expected.trim());
}

/// A port that is taken is a network error that says so, with the fix — not "config: …".
#[test]
fn a_port_in_use_is_a_network_error_with_a_hint() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(common::bin())
        .current_dir(common::repo())
        .args(["serve", "--ckpt"])
        .arg(common::reference().join("tiny_llm/model.pth"))
        .args(["--model", "tiny", "--clip", "none", "--device", "cpu"])
        .args(["--addr", &addr])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("network: cannot listen on {addr}")) && err.contains("HINT: "),
        "{err}"
    );
}

/// Hostile clients get a JSON error and the server keeps serving, with bounded memory: an image
/// whose header declares 10,000 × 10,000 pixels (decoded, with the f32 copies of the resize, it
/// cost 2.7 GB) is refused from the header; megabytes of text are refused by their byte length
/// before tokenising; a wrong method is a JSON 405; a body that never arrives is a 408 after the
/// body timeout; a connection that sends nothing is closed after the header timeout.
#[test]
fn hostile_requests_are_refused_with_bounded_memory_and_time() {
    use std::io::{Read, Write};
    let addr = server();
    let bomb = {
        let mut png = std::io::Cursor::new(Vec::new());
        image::GrayImage::new(10_000, 10_000)
            .write_to(&mut png, image::ImageFormat::Png)
            .unwrap();
        png.into_inner()
    };
    assert!(bomb.len() < 600_000, "{} bytes", bomb.len());
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&bomb)
    );
    let r = http::post_json(addr, "/v1/chat/completions", &ask(&[url], "x", json!({})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.text().contains("10000×10000 pixels, over the limit"),
        "{}",
        r.text()
    );

    let text = "x".repeat(600_000);
    let r = http::post_json(addr, "/v1/chat/completions", &ask(&[], &text, json!({})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "prompt_too_long");
    assert!(
        r.text()
            .contains("bytes, more than the model's max_seq_len"),
        "{}",
        r.text()
    );

    let r = http::get(addr, "/v1/chat/completions");
    assert_eq!(r.status, 405);
    assert_eq!(r.json()["error"]["code"], "method_not_allowed");

    // A declared length under the limit, two bytes sent: 408 once the body timeout (1 s) passes.
    let started = std::time::Instant::now();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{}}"
    )
    .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("body_timeout"), "{reply}");
    assert!(started.elapsed() < std::time::Duration::from_secs(8));

    // Silent: closed after the header timeout (1 s), not kept forever.
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let n = idle
        .read(&mut buf)
        .expect("the server closes the connection");
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&buf[..n]));

    // Still serving.
    assert_eq!(http::get(addr, "/health").status, 200);
    let rss = common::peak_rss();
    assert!(rss < 1 << 30, "peak RSS {} MiB", rss >> 20);
}
