//! Why an input did not become training data. Every skipped record, image or sample is one
//! `Reject` line in `rejects.jsonl` and one count in the manifest: nothing vanishes silently.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The JSON element is not a record of the expected shape.
    MalformedRecord,
    /// A record without an `image` field.
    NoImage,
    /// More images than the stage allows.
    TooManyImages,
    NoConversations,
    MalformedConversation,
    EmptyAnswer,
    /// `<image>` count in the kept questions differs from the number of images.
    ImageTagMismatch,
    PlaceholderTruncated,
    AnswerTruncated,
    /// The image is not in the zip or directory.
    MissingImage,
    /// Zero bytes.
    EmptyImage,
    /// Not decodable as an image (JPEG, PNG, WebP, GIF).
    CorruptImage,
    /// An image name that leaves the images root (`..`, an absolute path, a symlink out) or
    /// names something other than a regular file.
    UnsafePath,
    /// Over the image limits: its bytes, its width or height, or its pixel count.
    ImageTooLarge,
    /// More text than the model could ever read, refused before it is tokenized.
    TextTooLong,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MalformedRecord => "malformed_record",
            Reason::NoImage => "no_image",
            Reason::TooManyImages => "too_many_images",
            Reason::NoConversations => "no_conversations",
            Reason::MalformedConversation => "malformed_conversation",
            Reason::EmptyAnswer => "empty_answer",
            Reason::ImageTagMismatch => "image_tag_mismatch",
            Reason::PlaceholderTruncated => "placeholder_truncated",
            Reason::AnswerTruncated => "answer_truncated",
            Reason::MissingImage => "missing_image",
            Reason::EmptyImage => "empty_image",
            Reason::CorruptImage => "corrupt_image",
            Reason::UnsafePath => "unsafe_path",
            Reason::ImageTooLarge => "image_too_large",
            Reason::TextTooLong => "text_too_long",
        }
    }
}

/// One line of `rejects.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub reason: Reason,
    /// Index of the record in the source JSON array (for image rejects: the first record using it).
    pub record: usize,
    /// Record id(s) lost; for an image reject, every sample that used the image set.
    pub ids: Vec<String>,
    /// The image field as in the source JSON.
    pub image: String,
    pub detail: String,
}
