//! Channel info, the body of every publisher response.

use std::fmt::Write;

use crate::msgid::MsgId;

/// What the publisher endpoint reports about a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    /// Stored messages a new listener could still receive.
    pub messages: usize,
    /// Seconds since a listener last asked, `-1` if none ever did.
    pub requested: i64,
    /// Listeners waiting now, in every worker.
    pub listeners: u32,
    /// The last id published to the channel, `0` if none.
    pub last_message_id: MsgId,
}

/// The two formats of the channel info.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InfoFormat {
    Text,
    Json,
}

impl InfoFormat {
    /// JSON when the `Accept` header mentions json, plain text otherwise.
    pub fn from_accept(accept: Option<&[u8]>) -> InfoFormat {
        match accept {
            Some(a) if a.windows(4).any(|w| w.eq_ignore_ascii_case(b"json")) => InfoFormat::Json,
            _ => InfoFormat::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            InfoFormat::Text => "text/plain",
            InfoFormat::Json => "application/json",
        }
    }
}

impl ChannelInfo {
    /// Renders the body in `format`.
    pub fn render(&self, format: InfoFormat) -> String {
        let mut out = String::with_capacity(128);
        let last = if self.last_message_id == 0 {
            String::new()
        } else {
            self.last_message_id.to_string()
        };
        // Writing into a String cannot fail.
        let _ = match format {
            InfoFormat::Text => write!(
                out,
                "queued messages: {}\r\nlast requested: {} sec. ago\r\nactive listeners: {}\r\nlast message id: {}\r\n",
                self.messages, self.requested, self.listeners, last
            ),
            InfoFormat::Json => write!(
                out,
                "{{\"messages\":{},\"requested\":{},\"listeners\":{},\"last_message_id\":\"{}\"}}",
                self.messages, self.requested, self.listeners, last
            ),
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_json() {
        let info = ChannelInfo { messages: 2, requested: 3, listeners: 1, last_message_id: 17 };
        assert_eq!(
            info.render(InfoFormat::Text),
            "queued messages: 2\r\nlast requested: 3 sec. ago\r\nactive listeners: 1\r\nlast message id: 17\r\n"
        );
        let v: serde_json::Value = serde_json::from_str(&info.render(InfoFormat::Json)).unwrap();
        assert_eq!(v["messages"], 2);
        assert_eq!(v["requested"], 3);
        assert_eq!(v["listeners"], 1);
        assert_eq!(v["last_message_id"], "17");
        let never = ChannelInfo { messages: 0, requested: -1, listeners: 0, last_message_id: 0 };
        assert!(never.render(InfoFormat::Text).contains("last requested: -1 sec. ago"));
        assert!(never.render(InfoFormat::Json).contains("\"last_message_id\":\"\""));
    }

    #[test]
    fn accept_negotiation() {
        assert_eq!(InfoFormat::from_accept(None), InfoFormat::Text);
        assert_eq!(InfoFormat::from_accept(Some(b"text/html, */*")), InfoFormat::Text);
        assert_eq!(InfoFormat::from_accept(Some(b"application/JSON")), InfoFormat::Json);
        assert_eq!(InfoFormat::from_accept(Some(b"text/json;q=0.5")), InfoFormat::Json);
    }
}
