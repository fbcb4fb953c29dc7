//! Frames: `length:u32be | version:u8 | type:u16be | body`, where `length`
//! counts everything after itself.

use crate::codec::{DecodeError, EncodeError};
use crate::message::{Message, IGNORABLE_MESSAGE};
use crate::{MAX_FRAME_LEN, VERSION};

/// Bytes of the version and type that start every frame after its length.
const HEADER_LEN: usize = 3;

/// Appends `msg` as one frame to `out`. On error `out` is left as it was.
pub fn encode_frame(msg: &Message, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    out.push(VERSION);
    out.extend_from_slice(&msg.msg_type().to_be_bytes());
    if let Err(e) = msg.encode_body(out) {
        out.truncate(start);
        return Err(e);
    }
    let len = out.len() - start - 4;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(EncodeError::FrameTooLarge {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    // MAX_FRAME_LEN fits in a u32, so this conversion cannot fail once the
    // check above passed.
    let len = u32::try_from(len).map_err(|_| EncodeError::FrameTooLarge {
        len,
        max: MAX_FRAME_LEN,
    })?;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// One message as a frame of its own.
pub fn encode(msg: &Message) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::new();
    encode_frame(msg, &mut out)?;
    Ok(out)
}

/// Turns a byte stream into messages.
///
/// Feed it whatever arrived with [`FrameDecoder::feed`], then call
/// [`FrameDecoder::next_message`] until it returns `Ok(None)`. A frame that
/// announces more than the maximum length is refused as soon as its length is
/// read, so a peer cannot make the decoder buffer more than one maximal frame
/// plus what one `feed` brought. After an error the stream is out of step and
/// the decoder returns the same error forever: close the connection.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts; compacted lazily so a burst of
    /// small frames is not a quadratic series of copies.
    start: usize,
    max_frame: usize,
    failed: Option<DecodeError>,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::with_max_frame(MAX_FRAME_LEN)
    }

    /// A decoder with a smaller frame limit (never larger than the protocol's).
    pub fn with_max_frame(max_frame: usize) -> Self {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_frame: max_frame.min(MAX_FRAME_LEN),
            failed: None,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_some() {
            return;
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete message, `Ok(None)` when more bytes are needed.
    /// Frames of an unknown type with the ignorable bit set are skipped.
    pub fn next_message(&mut self) -> Result<Option<Message>, DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            match self.next_frame() {
                Ok(Some(Some(msg))) => return Ok(Some(msg)),
                Ok(Some(None)) => continue,
                Ok(None) => return Ok(None),
                Err(e) => {
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
    }

    /// Call when the stream has ended: an error if it ended inside a frame.
    pub fn finish(&self) -> Result<(), DecodeError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let have = self.buf.len() - self.start;
        if have == 0 {
            return Ok(());
        }
        let need = match self.buf[self.start..] {
            [a, b, c, d, ..] => 4 + u32::from_be_bytes([a, b, c, d]) as usize,
            _ => 4,
        };
        Err(DecodeError::Truncated { have, need })
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// `Some(None)`: a frame was consumed but skipped.
    fn next_frame(&mut self) -> Result<Option<Option<Message>>, DecodeError> {
        let rest = &self.buf[self.start..];
        let &[a, b, c, d, ..] = rest else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([a, b, c, d]) as usize;
        if len > self.max_frame {
            return Err(DecodeError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len < HEADER_LEN {
            return Err(DecodeError::FrameTooShort { len });
        }
        let Some(frame) = rest.get(4..4 + len) else {
            return Ok(None);
        };
        let version = frame[0];
        let ty = u16::from_be_bytes([frame[1], frame[2]]);
        let body = &frame[HEADER_LEN..];
        if version != VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let decoded = match Message::decode_body(ty, body) {
            Some(result) => Some(result?),
            None if ty & IGNORABLE_MESSAGE != 0 => None,
            None => return Err(DecodeError::UnknownMessage(ty)),
        };
        self.start += 4 + len;
        Ok(Some(decoded))
    }
}

/// Decodes exactly the frames in `bytes`, which must end at a frame boundary:
/// the first message, or `None` if there was none (empty input or only
/// skipped frames). Meant for tests and tools; streams use [`FrameDecoder`].
pub fn decode(bytes: &[u8]) -> Result<Option<Message>, DecodeError> {
    let mut d = FrameDecoder::new();
    d.feed(bytes);
    let first = d.next_message()?;
    while d.next_message()?.is_some() {}
    d.finish()?;
    Ok(first)
}
