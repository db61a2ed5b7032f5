//! Framing of the client protocol: a 4-byte big-endian length, then that many
//! bytes of one protobuf message (`proto/client.proto`, "FRAMES").
//!
//! Both ends use these functions, so the server and the SDK cannot disagree
//! about the format. A length above the reader's limit is refused before any
//! payload byte is read or buffered.

use prost::Message;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The default largest frame payload, in bytes (1 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 1 << 20;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended inside a frame.
    #[error("stream error: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds the reader's limit; the payload was not read.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The announced payload length.
        len: u32,
        /// The reader's limit.
        max: u32,
    },
    /// The payload is not the expected protobuf message.
    #[error("undecodable frame: {0}")]
    Malformed(#[from] prost::DecodeError),
}

/// Encodes `message` as one frame: length prefix and payload.
pub fn encode<M: Message>(message: &M) -> Vec<u8> {
    let len = message.encoded_len();
    let mut frame = Vec::with_capacity(4 + len);
    // A message over 4 GiB cannot be built from the protocol's limits; the
    // length field would be wrong, and the peer refuses it as too large.
    frame.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    message.encode_raw(&mut frame);
    frame
}

/// Reads one frame's payload, or `None` if the stream ended cleanly before a
/// frame began. Refuses a length above `max` without reading the payload.
pub async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut R,
    max: u32,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < prefix.len() {
        let n = reader.read(&mut prefix[filled..]).await?;
        if n == 0 {
            if filled == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
        filled += n;
    }
    let len = u32::from_be_bytes(prefix);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload).await?;
    Ok(Some(payload))
}

/// Reads one frame and decodes it as `M`; `None` on a clean end of stream.
pub async fn read<M: Message + Default, R: AsyncRead + Unpin>(
    reader: &mut R,
    max: u32,
) -> Result<Option<M>, FrameError> {
    match read_payload(reader, max).await? {
        None => Ok(None),
        Some(payload) => Ok(Some(M::decode(payload.as_slice())?)),
    }
}

/// Writes `message` as one frame.
pub async fn write<M: Message, W: AsyncWrite + Unpin>(
    writer: &mut W,
    message: &M,
) -> Result<(), FrameError> {
    writer.write_all(&encode(message)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{PingRequest, Request};

    fn ping(nonce: u64) -> Request {
        Request {
            request_id: 7,
            token: String::new(),
            body: Some(crate::client::request::Body::Ping(PingRequest { nonce })),
        }
    }

    #[tokio::test]
    async fn a_frame_round_trips_and_the_stream_end_is_seen() {
        let mut bytes = encode(&ping(42));
        bytes.extend(encode(&ping(43)));
        let mut reader = bytes.as_slice();
        let first: Option<Request> = read(&mut reader, 1024).await.expect("first");
        assert_eq!(first, Some(ping(42)));
        let second: Option<Request> = read(&mut reader, 1024).await.expect("second");
        assert_eq!(second, Some(ping(43)));
        let end: Option<Request> = read(&mut reader, 1024).await.expect("end");
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn a_huge_length_is_refused_before_reading() {
        let bytes = [0xff, 0xff, 0xff, 0xff, 1, 2, 3];
        let refused = read::<Request, _>(&mut bytes.as_slice(), 1024).await;
        assert!(matches!(
            refused,
            Err(FrameError::TooLarge {
                len: u32::MAX,
                max: 1024
            })
        ));
    }

    #[tokio::test]
    async fn truncated_and_garbage_frames_are_typed_errors() {
        let truncated = [0, 0, 0, 9, 1, 2];
        assert!(matches!(
            read::<Request, _>(&mut truncated.as_slice(), 1024).await,
            Err(FrameError::Io(_))
        ));
        let half_prefix = [0, 0];
        assert!(matches!(
            read::<Request, _>(&mut half_prefix.as_slice(), 1024).await,
            Err(FrameError::Io(_))
        ));
        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        assert!(matches!(
            read::<Request, _>(&mut garbage.as_slice(), 1024).await,
            Err(FrameError::Malformed(_))
        ));
    }
}
