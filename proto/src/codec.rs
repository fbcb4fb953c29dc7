//! The field encoding shared by every message body and by join tokens: a
//! sequence of `tag:u8 | length:u16be | value` fields in non-decreasing tag
//! order (see docs/control-protocol.md, "Fields").

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Tags at or above this value may be skipped by a receiver that does not know
/// them; an unknown tag below it is an error.
pub const IGNORABLE_TAG: u8 = 0x80;

/// Why a frame or token could not be decoded. `ctx` names the structure being
/// decoded (a message or a nested record) so the error says where it happened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame of {len} bytes is shorter than its 3-byte header")]
    FrameTooShort { len: usize },
    #[error("stream ended inside a frame: {have} of {need} bytes received")]
    Truncated { have: usize, need: usize },
    #[error("protocol version {0} is not supported (this side speaks version {ver})", ver = crate::VERSION)]
    UnsupportedVersion(u8),
    #[error("unknown message type {0:#06x}")]
    UnknownMessage(u16),
    #[error("{ctx}: field header cut off after {have} bytes")]
    FieldHeaderTruncated { ctx: &'static str, have: usize },
    #[error("{ctx}: field {tag} declares {len} bytes but only {have} remain")]
    FieldTruncated {
        ctx: &'static str,
        tag: u8,
        len: usize,
        have: usize,
    },
    #[error("{ctx}: field {tag} after field {after}; fields must be in ascending tag order")]
    FieldOrder {
        ctx: &'static str,
        tag: u8,
        after: u8,
    },
    #[error("{ctx}: field {tag} appears more than once")]
    DuplicateField { ctx: &'static str, tag: u8 },
    #[error("{ctx}: required field {tag} is missing")]
    MissingField { ctx: &'static str, tag: u8 },
    #[error("{ctx}: unknown field {tag} (below 128, so it may not be ignored)")]
    UnknownField { ctx: &'static str, tag: u8 },
    #[error("{ctx}: field {tag} has {len} bytes, expected {expected}")]
    BadLength {
        ctx: &'static str,
        tag: u8,
        len: usize,
        expected: &'static str,
    },
    #[error("{ctx}: field {tag} repeats more than {max} times")]
    TooMany {
        ctx: &'static str,
        tag: u8,
        max: usize,
    },
    #[error("{ctx}: field {tag}: {reason}")]
    InvalidValue {
        ctx: &'static str,
        tag: u8,
        reason: &'static str,
    },
}

/// Why a message could not be encoded: it breaks a limit the receiver would
/// enforce, so sending it would only earn an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{ctx}: field {tag} is {len} bytes, longer than its limit of {max}")]
    TooLong {
        ctx: &'static str,
        tag: u8,
        len: usize,
        max: usize,
    },
    #[error("{ctx}: field {tag} has {count} entries, more than its limit of {max}")]
    TooMany {
        ctx: &'static str,
        tag: u8,
        count: usize,
        max: usize,
    },
    #[error("encoded frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge { len: usize, max: usize },
}

/// Appends fields to a buffer. The caller writes tags in ascending order; the
/// decoder enforces it, and the round-trip tests catch a writer that does not.
pub(crate) struct Writer<'a> {
    pub(crate) buf: &'a mut Vec<u8>,
    pub(crate) ctx: &'static str,
}

impl Writer<'_> {
    pub(crate) fn bytes(&mut self, tag: u8, value: &[u8]) -> Result<(), EncodeError> {
        let len = u16::try_from(value.len()).map_err(|_| EncodeError::TooLong {
            ctx: self.ctx,
            tag,
            len: value.len(),
            max: usize::from(u16::MAX),
        })?;
        self.buf.push(tag);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(value);
        Ok(())
    }

    pub(crate) fn u8(&mut self, tag: u8, v: u8) -> Result<(), EncodeError> {
        self.bytes(tag, &[v])
    }

    pub(crate) fn u16(&mut self, tag: u8, v: u16) -> Result<(), EncodeError> {
        self.bytes(tag, &v.to_be_bytes())
    }

    pub(crate) fn u64(&mut self, tag: u8, v: u64) -> Result<(), EncodeError> {
        self.bytes(tag, &v.to_be_bytes())
    }

    pub(crate) fn bool(&mut self, tag: u8, v: bool) -> Result<(), EncodeError> {
        self.u8(tag, u8::from(v))
    }

    pub(crate) fn str(&mut self, tag: u8, v: &str, max: usize) -> Result<(), EncodeError> {
        if v.len() > max {
            return Err(EncodeError::TooLong {
                ctx: self.ctx,
                tag,
                len: v.len(),
                max,
            });
        }
        self.bytes(tag, v.as_bytes())
    }

    /// Each string as one repetition of `tag`.
    pub(crate) fn strs(
        &mut self,
        tag: u8,
        v: &[String],
        max_len: usize,
        max_count: usize,
    ) -> Result<(), EncodeError> {
        self.check_count(tag, v.len(), max_count)?;
        v.iter().try_for_each(|s| self.str(tag, s, max_len))
    }

    pub(crate) fn ipv4(&mut self, tag: u8, v: Ipv4Addr) -> Result<(), EncodeError> {
        self.bytes(tag, &v.octets())
    }

    pub(crate) fn ipv6(&mut self, tag: u8, v: Ipv6Addr) -> Result<(), EncodeError> {
        self.bytes(tag, &v.octets())
    }

    pub(crate) fn socket_addrs(
        &mut self,
        tag: u8,
        v: &[SocketAddr],
        max_count: usize,
    ) -> Result<(), EncodeError> {
        self.check_count(tag, v.len(), max_count)?;
        for addr in v {
            let mut b = Vec::with_capacity(18);
            match addr.ip() {
                IpAddr::V4(ip) => b.extend_from_slice(&ip.octets()),
                IpAddr::V6(ip) => b.extend_from_slice(&ip.octets()),
            }
            b.extend_from_slice(&addr.port().to_be_bytes());
            self.bytes(tag, &b)?;
        }
        Ok(())
    }

    pub(crate) fn prefix(&mut self, tag: u8, v: IpNet) -> Result<(), EncodeError> {
        let mut b = Vec::with_capacity(17);
        match v {
            IpNet::V4(n) => b.extend_from_slice(&n.addr().octets()),
            IpNet::V6(n) => b.extend_from_slice(&n.addr().octets()),
        }
        b.push(v.prefix_len());
        self.bytes(tag, &b)
    }

    /// A nested record: its own fields become the value of `tag`.
    pub(crate) fn nested(
        &mut self,
        tag: u8,
        ctx: &'static str,
        f: impl FnOnce(&mut Writer<'_>) -> Result<(), EncodeError>,
    ) -> Result<(), EncodeError> {
        let mut inner = Vec::new();
        f(&mut Writer {
            buf: &mut inner,
            ctx,
        })?;
        self.bytes(tag, &inner)
    }

    pub(crate) fn check_count(&self, tag: u8, count: usize, max: usize) -> Result<(), EncodeError> {
        if count > max {
            return Err(EncodeError::TooMany {
                ctx: self.ctx,
                tag,
                count,
                max,
            });
        }
        Ok(())
    }
}

/// Walks the fields of one structure, checking the framing of each field and
/// the tag order. What a tag means is up to the caller.
pub(crate) struct Fields<'a> {
    data: &'a [u8],
    pos: usize,
    last: Option<u8>,
    pub(crate) ctx: &'static str,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(data: &'a [u8], ctx: &'static str) -> Self {
        Fields {
            data,
            pos: 0,
            last: None,
            ctx,
        }
    }

    pub(crate) fn next_field(&mut self) -> Result<Option<(u8, &'a [u8])>, DecodeError> {
        let rest = &self.data[self.pos..];
        if rest.is_empty() {
            return Ok(None);
        }
        let &[tag, hi, lo, ..] = rest else {
            return Err(DecodeError::FieldHeaderTruncated {
                ctx: self.ctx,
                have: rest.len(),
            });
        };
        let len = usize::from(u16::from_be_bytes([hi, lo]));
        let Some(value) = rest.get(3..3 + len) else {
            return Err(DecodeError::FieldTruncated {
                ctx: self.ctx,
                tag,
                len,
                have: rest.len() - 3,
            });
        };
        if let Some(after) = self.last {
            if tag < after {
                return Err(DecodeError::FieldOrder {
                    ctx: self.ctx,
                    tag,
                    after,
                });
            }
        }
        self.last = Some(tag);
        self.pos += 3 + len;
        Ok(Some((tag, value)))
    }

    /// The rule for tags the caller does not know.
    pub(crate) fn unknown(&self, tag: u8) -> Result<(), DecodeError> {
        if tag >= IGNORABLE_TAG {
            Ok(())
        } else {
            Err(DecodeError::UnknownField { ctx: self.ctx, tag })
        }
    }

    pub(crate) fn set<T>(&self, slot: &mut Option<T>, tag: u8, v: T) -> Result<(), DecodeError> {
        if slot.is_some() {
            return Err(DecodeError::DuplicateField { ctx: self.ctx, tag });
        }
        *slot = Some(v);
        Ok(())
    }

    pub(crate) fn push<T>(
        &self,
        list: &mut Vec<T>,
        max: usize,
        tag: u8,
        v: T,
    ) -> Result<(), DecodeError> {
        if list.len() >= max {
            return Err(DecodeError::TooMany {
                ctx: self.ctx,
                tag,
                max,
            });
        }
        list.push(v);
        Ok(())
    }

    pub(crate) fn need<T>(&self, slot: Option<T>, tag: u8) -> Result<T, DecodeError> {
        slot.ok_or(DecodeError::MissingField { ctx: self.ctx, tag })
    }

    fn bad_len(&self, tag: u8, v: &[u8], expected: &'static str) -> DecodeError {
        DecodeError::BadLength {
            ctx: self.ctx,
            tag,
            len: v.len(),
            expected,
        }
    }

    pub(crate) fn array<const N: usize>(
        &self,
        tag: u8,
        v: &[u8],
        expected: &'static str,
    ) -> Result<[u8; N], DecodeError> {
        v.try_into().map_err(|_| self.bad_len(tag, v, expected))
    }

    pub(crate) fn u8(&self, tag: u8, v: &[u8]) -> Result<u8, DecodeError> {
        self.array::<1>(tag, v, "1").map(|[b]| b)
    }

    pub(crate) fn u16(&self, tag: u8, v: &[u8]) -> Result<u16, DecodeError> {
        self.array(tag, v, "2").map(u16::from_be_bytes)
    }

    pub(crate) fn u64(&self, tag: u8, v: &[u8]) -> Result<u64, DecodeError> {
        self.array(tag, v, "8").map(u64::from_be_bytes)
    }

    pub(crate) fn bool(&self, tag: u8, v: &[u8]) -> Result<bool, DecodeError> {
        match self.u8(tag, v)? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(DecodeError::InvalidValue {
                ctx: self.ctx,
                tag,
                reason: "a boolean must be 0 or 1",
            }),
        }
    }

    pub(crate) fn str(&self, tag: u8, v: &[u8], max: usize) -> Result<String, DecodeError> {
        if v.len() > max {
            return Err(self.bad_len(tag, v, "at most the field's limit"));
        }
        std::str::from_utf8(v)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidValue {
                ctx: self.ctx,
                tag,
                reason: "not valid UTF-8",
            })
    }

    pub(crate) fn ipv4(&self, tag: u8, v: &[u8]) -> Result<Ipv4Addr, DecodeError> {
        self.array::<4>(tag, v, "4").map(Ipv4Addr::from)
    }

    pub(crate) fn ipv6(&self, tag: u8, v: &[u8]) -> Result<Ipv6Addr, DecodeError> {
        self.array::<16>(tag, v, "16").map(Ipv6Addr::from)
    }

    pub(crate) fn socket_addr(&self, tag: u8, v: &[u8]) -> Result<SocketAddr, DecodeError> {
        let port = |p: &[u8]| u16::from_be_bytes([p[0], p[1]]);
        match v.len() {
            6 => {
                let ip: [u8; 4] = self.array(tag, &v[..4], "6 or 18")?;
                Ok(SocketAddr::new(Ipv4Addr::from(ip).into(), port(&v[4..])))
            }
            18 => {
                let ip: [u8; 16] = self.array(tag, &v[..16], "6 or 18")?;
                Ok(SocketAddr::new(Ipv6Addr::from(ip).into(), port(&v[16..])))
            }
            _ => Err(self.bad_len(tag, v, "6 or 18")),
        }
    }

    pub(crate) fn prefix(&self, tag: u8, v: &[u8]) -> Result<IpNet, DecodeError> {
        let invalid = DecodeError::InvalidValue {
            ctx: self.ctx,
            tag,
            reason: "prefix length longer than the address",
        };
        match v.len() {
            5 => {
                let ip: [u8; 4] = self.array(tag, &v[..4], "5 or 17")?;
                Ipv4Net::new(ip.into(), v[4])
                    .map(IpNet::V4)
                    .map_err(|_| invalid)
            }
            17 => {
                let ip: [u8; 16] = self.array(tag, &v[..16], "5 or 17")?;
                Ipv6Net::new(ip.into(), v[16])
                    .map(IpNet::V6)
                    .map_err(|_| invalid)
            }
            _ => Err(self.bad_len(tag, v, "5 or 17")),
        }
    }
}
