//! The model stage: a bundle of graphs, tokenizer and settings on disk, and the tract runtime
//! that answers questions with it. See ARCHITECTURE.md, "Model bundle".

mod answer;
mod attention;
mod audio_features;
mod block_matmul;
mod block_matrix;
mod bundle;
mod chat;
mod constrained;
mod fast_gelu;
mod half_tables;
mod image_input;
mod kv_cache;
mod output_layer;
mod per_layer_embeddings;
mod product_threads;
mod runtime;
mod sampling;
mod tokenizer;
mod tools;

pub use answer::{Answer, Model, ModelError, Question};
pub use attention::{fuse as fuse_attention, IMAGE_QUERY_BLOCK, TEXT_QUERY_BLOCK};
pub use audio_features::{AudioFeatureParams, AudioFeatures, LogMelExtractor};
pub use block_matrix::{kernel_name as block_kernel, BlockFormat, BlockMatrix, BlockMatrixError};
pub use bundle::{sha256_file, Architecture, Bundle, BundleError, BundleFile, Manifest, FORMAT, FORMAT_VERSION};
pub use chat::{render as render_chat, Part, Role, Turn};
pub use constrained::{Constraint, ConstraintError, ConstraintTimings, Grammar, GrammarKind, TokenConstraints};
pub use image_input::{
    prepare as prepare_image, target_size, ImageInputError, ImageParams, ImagePatches, SOFT_TOKEN_BUDGETS,
};
pub use kv_cache::{append_in_place as append_cache_in_place, with_room as cache_with_room};
pub use output_layer::{OutputLayer, OutputLayerError};
pub use per_layer_embeddings::{PerLayerEmbeddings, PerLayerEmbeddingsError, PerLayerLayout};
pub use runtime::{
    last_row, load_graph, use_threads, values, Embedded, Encoders, KvCache, LogitRows, Runtime, RuntimeError,
    SoftTokens,
};
pub use sampling::{argmax, Sampler, Sampling};
pub use tokenizer::{TextStream, Tokenizer, TokenizerError};
pub use tools::{
    render_tool_response, Identifier, ParameterName, ToolCall, ToolCallError, ToolDeclaration, ToolError, ToolName,
    ToolParameter, ToolSet,
};
