//! Framing: how [`Message`]s become bytes on a stream and back.
//!
//! A frame is an 8-byte header followed by a bincode payload:
//!
//! ```text
//! offset  size  field
//! 0       2     magic  b"GF"
//! 2       2     protocol version, big-endian u16
//! 4       4     payload length in bytes, big-endian u32
//! 8       len   payload: bincode 2 (standard config, serde) encoding of a Message
//! ```
//!
//! The version is read from the header before anything else, so a peer on
//! another protocol version gets [`ProtocolError::VersionMismatch`] even when
//! its payload would not decode. The length is checked against the
//! configured maximum before any payload is buffered, and a payload must be
//! consumed exactly (no trailing bytes).

use crate::{PROTOCOL_VERSION, error::ProtocolError, message::Message};

/// Magic bytes at the start of every frame.
pub const MAGIC: [u8; 2] = *b"GF";
/// Size of the frame header in bytes.
pub const HEADER_LEN: usize = 8;
/// Default maximum payload size: 256 MiB, room for models of ~60M parameters.
pub const DEFAULT_MAX_FRAME: usize = 256 << 20;
/// Upper bound for any configured maximum (the header's u32 length field).
pub const MAX_FRAME_CEILING: usize = u32::MAX as usize;

/// Upper bound bincode may claim while decoding one payload of the largest
/// frame.
const BINCODE_LIMIT: usize = 1 << 32;

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<BINCODE_LIMIT>()
}

/// Decodes `payload` with a bincode claim limit of `LIMIT` bytes.
fn decode_with_limit<const LIMIT: usize>(
    payload: &[u8],
) -> Result<(Message, usize), bincode::error::DecodeError> {
    let config = bincode::config::standard().with_limit::<LIMIT>();
    bincode::serde::decode_from_slice(payload, config)
}

/// Decodes `payload` with a claim limit proportionate to its length.
///
/// bincode allocates a string or byte buffer at the length its prefix
/// claims before reading the bytes (a 20-byte payload could claim 4 GiB),
/// checking the claim only against its limit, which is a type parameter.
/// Every claimed byte of an honest payload is a byte of the payload, so the
/// smallest of a few limits at least as long as the payload admits it, and
/// a lying length prefix allocates nothing: its claim exceeds the limit,
/// which is below 16 times the payload (64 KiB for small ones). Found by the
/// `frame` fuzz target.
fn decode_limited(payload: &[u8]) -> Result<(Message, usize), bincode::error::DecodeError> {
    const KIB_64: usize = 1 << 16;
    const MIB: usize = 1 << 20;
    const MIB_16: usize = 1 << 24;
    const MIB_256: usize = 1 << 28;
    let len = payload.len();
    if len <= KIB_64 {
        decode_with_limit::<KIB_64>(payload)
    } else if len <= MIB {
        decode_with_limit::<MIB>(payload)
    } else if len <= MIB_16 {
        decode_with_limit::<MIB_16>(payload)
    } else if len <= MIB_256 {
        decode_with_limit::<MIB_256>(payload)
    } else {
        decode_with_limit::<BINCODE_LIMIT>(payload)
    }
}

/// Encodes `msg` as one frame. Fails with [`ProtocolError::FrameTooLarge`] if
/// the payload exceeds `max_frame` bytes.
pub fn encode_frame(msg: &Message, max_frame: usize) -> Result<Vec<u8>, ProtocolError> {
    let encode_error = |e: bincode::error::EncodeError| ProtocolError::Encode(e.to_string());
    // Sized first (cheap: models serialize as one borrowed run of bytes),
    // so that a frame carrying a model is written into one allocation.
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(msg, &mut size, bincode_config()).map_err(encode_error)?;
    let mut out = Vec::with_capacity(HEADER_LEN + size.bytes_written);
    out.resize(HEADER_LEN, 0);
    bincode::serde::encode_into_std_write(msg, &mut out, bincode_config()).map_err(encode_error)?;
    let len = out.len() - HEADER_LEN;
    let max = max_frame.min(MAX_FRAME_CEILING);
    if len > max {
        return Err(ProtocolError::FrameTooLarge { size: len, max });
    }
    out[0..2].copy_from_slice(&MAGIC);
    out[2..4].copy_from_slice(&PROTOCOL_VERSION.to_be_bytes());
    out[4..8].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one complete payload (without header).
pub fn decode_payload(payload: &[u8]) -> Result<Message, ProtocolError> {
    let (msg, used) = decode_limited(payload).map_err(|e| match e {
        bincode::error::DecodeError::LimitExceeded => ProtocolError::Malformed(format!(
            "a length inside the {}-byte message claims more bytes than it holds",
            payload.len()
        )),
        e => ProtocolError::Malformed(e.to_string()),
    })?;
    if used != payload.len() {
        return Err(ProtocolError::Malformed(format!(
            "{} trailing bytes after the message",
            payload.len() - used
        )));
    }
    Ok(msg)
}

/// Incremental frame decoder: feed it bytes as they arrive, take messages
/// out. "Not enough bytes yet" is `Ok(None)`, not an error.
///
/// After an error the decoder is poisoned: every later call returns the same
/// error, since the byte stream can no longer be trusted.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    pos: usize,
    max_frame: usize,
    poisoned: Option<ProtocolError>,
}

impl FrameDecoder {
    /// A decoder that refuses payloads over `max_frame` bytes.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            pos: 0,
            max_frame: max_frame.min(MAX_FRAME_CEILING),
            poisoned: None,
        }
    }

    /// Changes the maximum payload size for frames not yet started (e.g. a
    /// small limit until a peer has introduced itself, a large one after).
    pub fn set_max_frame(&mut self, max_frame: usize) {
        self.max_frame = max_frame.min(MAX_FRAME_CEILING);
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Number of buffered bytes not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The payload length announced by the buffered header, once the header
    /// has arrived and been validated. Lets a reader size its buffer.
    pub fn pending_frame_len(&mut self) -> Result<Option<usize>, ProtocolError> {
        self.check_header().map(|h| h.map(|len| HEADER_LEN + len))
    }

    fn check_header(&mut self) -> Result<Option<usize>, ProtocolError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        let avail = &self.buf[self.pos..];
        // Check the magic and version as soon as their bytes are here.
        if !avail.is_empty() && avail[0] != MAGIC[0] || avail.len() >= 2 && avail[..2] != MAGIC {
            return Err(self.poison(ProtocolError::BadMagic));
        }
        if avail.len() < 4 {
            return Ok(None);
        }
        let version = u16::from_be_bytes([avail[2], avail[3]]);
        if version != PROTOCOL_VERSION {
            return Err(self.poison(ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            }));
        }
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([avail[4], avail[5], avail[6], avail[7]]) as usize;
        if len > self.max_frame {
            return Err(self.poison(ProtocolError::FrameTooLarge {
                size: len,
                max: self.max_frame,
            }));
        }
        Ok(Some(len))
    }

    /// The next complete message, `Ok(None)` if more bytes are needed.
    pub fn next_message(&mut self) -> Result<Option<Message>, ProtocolError> {
        let Some(len) = self.check_header()? else {
            return Ok(None);
        };
        if self.buffered() < HEADER_LEN + len {
            return Ok(None);
        }
        let start = self.pos + HEADER_LEN;
        let result = decode_payload(&self.buf[start..start + len]);
        self.pos = start + len;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > (1 << 20) {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        result.map(Some).map_err(|e| self.poison(e))
    }

    /// Call at end of stream: an error if a frame was left unfinished.
    pub fn finish(&self) -> Result<(), ProtocolError> {
        if let Some(e) = &self.poisoned {
            return Err(e.clone());
        }
        match self.buffered() {
            0 => Ok(()),
            n => Err(ProtocolError::TruncatedFrame { buffered: n }),
        }
    }

    fn poison(&mut self, e: ProtocolError) -> ProtocolError {
        self.poisoned = Some(e.clone());
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{AggregationPayload, Hello};
    use crate::weights::{ModelWeights, NamedTensor};

    fn hello() -> Message {
        Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            train_samples: 700,
            test_samples: 150,
            image_size: (28, 28),
            classes: vec!["cat".into(), "dog".into()],
            cipher: Some(crate::cipher::CipherSpec {
                steps: "le".parse().unwrap(),
                block_size: 4,
                key_id: "00112233aabbccdd".into(),
            }),
        })
    }

    fn train_request() -> Message {
        let w = ModelWeights::new(vec![
            NamedTensor::new("a", vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]).unwrap(),
        ])
        .unwrap();
        Message::TrainRequest {
            evaluates: None,
            sealed: None,
            round: 3,
            global: crate::GlobalModel::Weights(w.into()),
            seed: 42,
        }
    }

    #[test]
    fn round_trip_several_messages_byte_by_byte() {
        let msgs = vec![
            hello(),
            train_request(),
            Message::Evaluation {
                round: 1,
                payload: AggregationPayload::Plain {
                    update: vec![0.5, -0.25],
                    weight: 4.0,
                },
            },
        ];
        let mut stream = Vec::new();
        for m in &msgs {
            stream.extend(encode_frame(m, DEFAULT_MAX_FRAME).unwrap());
        }
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut out = Vec::new();
        for b in &stream {
            dec.push(std::slice::from_ref(b));
            while let Some(m) = dec.next_message().unwrap() {
                out.push(m);
            }
        }
        assert_eq!(out, msgs);
        dec.finish().unwrap();
    }

    #[test]
    fn truncated_stream_is_reported_at_finish() {
        let frame = encode_frame(&hello(), DEFAULT_MAX_FRAME).unwrap();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&frame[..frame.len() - 1]);
        assert_eq!(dec.next_message().unwrap(), None);
        assert_eq!(
            dec.finish(),
            Err(ProtocolError::TruncatedFrame {
                buffered: frame.len() - 1
            })
        );
    }

    #[test]
    fn oversized_frame_rejected_from_header_alone() {
        let mut dec = FrameDecoder::new(1024);
        let mut header = MAGIC.to_vec();
        header.extend(PROTOCOL_VERSION.to_be_bytes());
        header.extend(u32::MAX.to_be_bytes());
        dec.push(&header);
        assert_eq!(
            dec.next_message(),
            Err(ProtocolError::FrameTooLarge {
                size: u32::MAX as usize,
                max: 1024
            })
        );
        // Poisoned: the same error again, even with more bytes.
        dec.push(&[0; 16]);
        assert!(matches!(
            dec.next_message(),
            Err(ProtocolError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn encoder_refuses_oversized_payload() {
        assert!(matches!(
            encode_frame(&train_request(), 8),
            Err(ProtocolError::FrameTooLarge { max: 8, .. })
        ));
    }

    #[test]
    fn other_protocol_version_is_a_clear_error() {
        let mut frame = encode_frame(&hello(), DEFAULT_MAX_FRAME).unwrap();
        frame[2..4].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&frame[..4]); // version known before the rest arrives
        let err = dec.next_message().unwrap_err();
        assert_eq!(
            err,
            ProtocolError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: PROTOCOL_VERSION + 1
            }
        );
        assert!(err.to_string().contains("version"));
    }

    #[test]
    fn bad_magic_rejected_on_first_byte() {
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(b"G");
        assert_eq!(dec.next_message(), Ok(None));
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(dec.next_message(), Err(ProtocolError::BadMagic));
    }

    #[test]
    fn garbage_payload_and_trailing_bytes_are_malformed() {
        let mut frame = encode_frame(&hello(), DEFAULT_MAX_FRAME).unwrap();
        // Unknown enum variant index.
        frame[HEADER_LEN] = 200;
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        dec.push(&frame);
        assert!(matches!(
            dec.next_message(),
            Err(ProtocolError::Malformed(_))
        ));

        let good = encode_frame(&hello(), DEFAULT_MAX_FRAME).unwrap();
        let mut padded = good[HEADER_LEN..].to_vec();
        padded.push(0);
        assert!(matches!(
            decode_payload(&padded),
            Err(ProtocolError::Malformed(m)) if m.contains("trailing")
        ));
    }

    #[test]
    fn huge_length_prefix_inside_payload_does_not_allocate() {
        // A TrainRequest whose tensor claims 2^60 floats in a tiny payload.
        let frame = encode_frame(&train_request(), DEFAULT_MAX_FRAME).unwrap();
        let mut payload = frame[HEADER_LEN..].to_vec();
        // Corrupt every byte in turn: decoding must fail or succeed, never panic.
        for i in 0..payload.len() {
            let saved = payload[i];
            for v in [0u8, 0x7f, 0xfb, 0xfc, 0xfd, 0xff] {
                payload[i] = v;
                let _ = decode_payload(&payload);
            }
            payload[i] = saved;
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let mut dec = FrameDecoder::new(4096);
                let mut framed = MAGIC.to_vec();
                framed.extend(PROTOCOL_VERSION.to_be_bytes());
                framed.extend((bytes.len() as u32).to_be_bytes());
                framed.extend(&bytes);
                dec.push(&framed);
                let _ = dec.next_message();
                let _ = decode_payload(&bytes);
            }

            #[test]
            fn split_points_do_not_matter(split in 0usize..200) {
                let frame = encode_frame(&train_request(), DEFAULT_MAX_FRAME).unwrap();
                let split = split.min(frame.len());
                let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
                dec.push(&frame[..split]);
                let first = dec.next_message().unwrap();
                dec.push(&frame[split..]);
                let msg = match first { Some(m) => m, None => dec.next_message().unwrap().unwrap() };
                prop_assert_eq!(msg, train_request());
            }
        }
    }
}
