//! Uploads: tickets and PUTs, multipart, what is stored and how it is served.

use crate::common::{body, multipart_upload, png_bytes, start, start_with, Gate, KEY};
use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use serde_json::{json, Value};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread")]
async fn upload_flows_and_submitting_an_upload() {
    let h = start(|_| {}).await;
    let png = {
        let mut out = Vec::new();
        image::RgbImage::new(20, 10)
            .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    };
    // ticket + PUT (no Authorization on the PUT)
    let (s, v) = h
        .open_ticket(
            json!({"filename": "../cat pic.png", "size": png.len(), "content_type": "image/png"}),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    let d = &v["data"];
    assert_eq!(
        (d["type"].as_str(), d["filename"].as_str()),
        (Some("image"), Some("cat_pic.png"))
    );
    assert_eq!(d["upload"]["method"], "PUT");
    assert_eq!(d["upload"]["headers"]["Content-Type"], "image/png");
    let put_url = d["upload"]["url"]
        .as_str()
        .unwrap()
        .strip_prefix("http://gen.local:8000")
        .unwrap()
        .to_string();
    let put = |url: &str, bytes: &[u8]| {
        Request::put(url)
            .header(header::CONTENT_TYPE, "image/png")
            .body(Body::from(bytes.to_vec()))
            .unwrap()
    };
    let (s, _, b) = h.call(put(&put_url, &png[..10])).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (s, _, b) = h.call(put(&put_url, &png)).await;
    assert_eq!(
        s,
        StatusCode::NOT_FOUND,
        "single use: {}",
        String::from_utf8_lossy(&b)
    );
    // a fresh ticket, right size
    let (_, v) = h
        .open_ticket(json!({"filename": "cat.png", "size": png.len()}))
        .await;
    let put_url = v["data"]["upload"]["url"]
        .as_str()
        .unwrap()
        .strip_prefix("http://gen.local:8000")
        .unwrap()
        .to_string();
    let download = v["data"]["download_url"].as_str().unwrap().to_string();
    let (s, _, b) = h.call(put(&put_url, &png)).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let (s, _, b) = h.call(put(&put_url, &png)).await;
    assert_eq!(s, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&b));
    let path = download.strip_prefix("http://gen.local:8000").unwrap();
    let (s, hd, bytes) = h
        .call(Request::get(path).body(Body::empty()).unwrap())
        .await;
    assert_eq!((s, bytes.as_slice()), (StatusCode::OK, png.as_slice()));
    assert_eq!(hd[header::CONTENT_TYPE], "image/png");
    // missing fields
    let (s, v) = h.open_ticket(json!({"size": 3})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(v["message"].as_str().unwrap().starts_with("filename:"));
    let (s, _) = h.open_ticket(json!({"filename": "a.png"})).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    // submitting the uploaded URL reads the file locally (a loopback URL would otherwise be refused)
    let (_, v) = h.submit(json!({"prompt": "p", "image": download})).await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    assert_eq!(
        h.seen.lock().unwrap()[0]
            .image
            .as_ref()
            .unwrap()
            .dimensions(),
        (96, 64)
    );

    // multipart binary upload
    let boundary = "XyZ";
    let mut form = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"dog.png\"\r\nContent-Type: image/png\r\n\r\n").into_bytes();
    form.extend_from_slice(&png);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let req = Request::post("/api/v3/media/upload/binary")
        .header(header::HOST, "gen.local:8000")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(form))
        .unwrap();
    let (s, _, bytes) = h.call(req).await;
    let v: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(s, StatusCode::OK, "{v}");
    assert_eq!(
        (v["data"]["filename"].as_str(), v["data"]["size"].as_u64()),
        (Some("dog.png"), Some(png.len() as u64))
    );
    let (_, v) = h
        .submit(json!({"prompt": "p", "image": v["data"]["download_url"]}))
        .await;
    h.wait(v["data"]["id"].as_str().unwrap(), &["completed"])
        .await;
    let req = Request::post("/api/v3/media/upload/binary")
        .header(header::AUTHORIZATION, format!("Bearer {KEY}"))
        .header(
            header::CONTENT_TYPE,
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(Body::from(format!("--{boundary}--\r\n")))
        .unwrap();
    let (s, _, _) = h.call(req).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
}

/// A body that counts how often it is read and would send `chunks` MiB.
struct CountingBody {
    polls: Arc<std::sync::atomic::AtomicUsize>,
    chunks: usize,
}

impl http_body::Body for CountingBody {
    type Data = axum::body::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.polls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.chunks == 0 {
            return std::task::Poll::Ready(None);
        }
        self.chunks -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(vec![0u8; 1 << 20].into()))))
    }
}

fn counting(chunks: usize) -> (Body, Arc<std::sync::atomic::AtomicUsize>) {
    let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let body = Body::new(CountingBody {
        polls: polls.clone(),
        chunks,
    });
    (body, polls)
}

/// Finding 2: a PUT body was buffered before its token (and declared size) was checked.
#[tokio::test(flavor = "multi_thread")]
async fn upload_puts_are_checked_before_their_body_is_read() {
    let h = start(|_| {}).await;
    let (body, polls) = counting(60);
    let req = Request::put("/api/v3/media/uploads/invented-token")
        .body(body)
        .unwrap();
    let (s, _, _) = h.call(req).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(
        polls.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "body read for an unknown token"
    );
    // a real ticket, but a declared length that is not the ticket's size
    let ticket =
        |size: usize| json!({"filename": "a.png", "size": size, "content_type": "image/png"});
    let url = h.ticket(ticket(100)).await;
    let (body, polls) = counting(60);
    let req = Request::put(&url)
        .header(header::CONTENT_LENGTH, (60usize << 20).to_string())
        .body(body)
        .unwrap();
    let (s, _, b) = h.call(req).await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(polls.load(std::sync::atomic::Ordering::SeqCst), 0);
    // no declared length: the stream stops at the ticket's size, not at the end of 60 MiB
    let url = h.ticket(ticket(100)).await;
    let (body, polls) = counting(60);
    let (s, _, _) = h.call(Request::put(&url).body(body).unwrap()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        polls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "read past the cap"
    );
    // nothing was left on disk by the refused uploads
    let left: Vec<_> = std::fs::read_dir(h.dir.path().join("uploads"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Finding 5: declared content types were trusted and served back on our origin.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_accept_only_raster_images_and_are_served_inert() {
    let h = start(|_| {}).await;
    let multipart = |name: &str, ct: &str, bytes: &[u8]| multipart_upload(KEY, name, ct, bytes);
    let html = b"<html><script>alert(document.cookie)</script></html>";
    let svg = b"<svg xmlns=\"http://www.w3.org/2000/svg\" onload=\"alert(1)\"/>";
    for (name, ct, bytes) in [
        ("x.html", "text/html", &html[..]),
        ("x.svg", "image/svg+xml", &svg[..]),
        ("x.png", "image/png", &html[..]),
    ] {
        let (s, _, b) = h.call(multipart(name, ct, bytes)).await;
        assert_eq!(
            s,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{name}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    // a declared HTML ticket is refused; a PNG ticket carrying SVG bytes too
    let (s, _) = h
        .open_ticket(json!({"filename": "x.html", "size": html.len(), "content_type": "text/html"}))
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let url = h
        .ticket(json!({"filename": "x.png", "size": svg.len(), "content_type": "image/png"}))
        .await;
    let (s, _, _) = h
        .call(Request::put(&url).body(Body::from(svg.to_vec())).unwrap())
        .await;
    assert_eq!(s, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // a real PNG declared as HTML is stored as what it is, and served inert
    let png = png_bytes(4, 4);
    let (s, _, b) = h.call(multipart("x.html", "text/html", &png)).await;
    assert_eq!(s, StatusCode::OK);
    let v: Value = serde_json::from_slice(&b).unwrap();
    let path = v["data"]["download_url"]
        .as_str()
        .unwrap()
        .replace("http://gen.local:8000", "");
    let (s, hd, bytes) = h
        .call(Request::get(&path).body(Body::empty()).unwrap())
        .await;
    assert_eq!((s, bytes), (StatusCode::OK, png.clone()));
    assert_eq!(hd[header::CONTENT_TYPE], "image/png");
    assert_eq!(hd[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(hd[header::CONTENT_SECURITY_POLICY], "sandbox");
    assert_eq!(hd[header::X_FRAME_OPTIONS], "DENY");
    // outputs too
    let (_, v) = h.submit(body("p")).await;
    let id = v["data"]["id"].as_str().unwrap().to_string();
    h.wait(&id, &["completed"]).await;
    let (_, hd, _) = h
        .call(
            Request::get(format!("/outputs/{id}.mp4"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(hd[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert_eq!(hd[header::CONTENT_SECURITY_POLICY], "sandbox");
    assert_eq!(hd[header::X_FRAME_OPTIONS], "DENY");
    // an upload stored by an earlier version with a declared HTML type is served as a download
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("uploads")).unwrap();
    let old = "0123456789abcdef0123456789abcdef";
    std::fs::write(dir.path().join(format!("uploads/{old}.bin")), html).unwrap();
    std::fs::write(
        dir.path().join(format!("uploads/{old}.json")),
        json!({"id": old, "filename": "x.html", "content_type": "text/html", "size": html.len(), "created_at": 1, "complete": true, "base_url": "http://gen.local:8000"}).to_string(),
    )
    .unwrap();
    let gate = Gate::closed();
    gate.open();
    let legacy = start_with(dir, |_| {}, gate).await;
    let (s, hd, _) = legacy
        .call(
            Request::get(format!("/api/v3/media/files/{old}/x.html"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hd[header::CONTENT_TYPE], "application/octet-stream");
    assert_eq!(hd[header::CONTENT_DISPOSITION], "attachment");
    assert_eq!(hd[header::CONTENT_SECURITY_POLICY], "sandbox");
}
