//! `GET /events/stream`: the live tail over a WebSocket, one JSON event per
//! text message. A client that falls [`TAIL_QUEUE_EVENTS`] events behind is
//! closed with code 1008 ("policy violation") and a reason saying so; on
//! shutdown every tail is closed with 1001 ("going away").

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code};
use axum::extract::{RawQuery, State};
use axum::response::Response;

use super::AppState;
use super::error::ApiError;
use super::params;
use crate::api::json::event_to_json;
use crate::tail::{Subscription, TAIL_QUEUE_EVENTS, TailEnd};

pub async fn stream(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let filter = params::tail(&params::pairs(raw.as_deref()))?;
    // Subscribed before the upgrade answer is sent: every event stored
    // after the client sees the 101 reaches it.
    let sub = state.db.subscribe(filter);
    Ok(ws.on_upgrade(move |socket| run(socket, sub, state)))
}

async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}

async fn run(mut socket: WebSocket, mut sub: Subscription, state: AppState) {
    let mut shutdown = state.shutdown.clone();
    if *shutdown.borrow() {
        return close(socket, close_code::AWAY, "server shutting down").await;
    }
    loop {
        tokio::select! {
            next = sub.next() => match next {
                Ok(event) => {
                    let text = event_to_json(&event);
                    if socket.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
                Err(TailEnd::Lagged) => {
                    let reason = format!("slow consumer: fell {TAIL_QUEUE_EVENTS} events behind");
                    return close(socket, close_code::POLICY, &reason).await;
                }
                Err(TailEnd::Closed) => {
                    return close(socket, close_code::AWAY, "server shutting down").await;
                }
            },
            incoming = socket.recv() => match incoming {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
            _ = shutdown.changed() => {
                return close(socket, close_code::AWAY, "server shutting down").await;
            }
        }
    }
}
