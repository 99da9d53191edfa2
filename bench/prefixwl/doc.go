// Package prefixwl generates seeded shared-prefix workloads: the request
// streams that a serving engine's prefix cache sees, as token ids, with
// their own exact count of unique prefix groups and the hits an ideal
// token-addressed store gives each request. `hcache bench prefix` drives a
// store and the file-per-chunk-hash peer with them; `hcache simulate prefix`
// prices their hits on a profile.
//
// # Requests
//
// A request is a prompt the engine prefills (Tokens[:Prompt]) and the
// answer it generates (Tokens[Prompt:]); after the request the whole of
// Tokens is saved. A request belongs to a session: the conversation id a
// store keyed by conversation (hcache before issue 19) would use. Token ids
// are uniform in [0, Vocab) from a seeded generator (Llama 2's 32,000), so
// two prompts share a prefix only where the workload makes them share one.
//
// # Workloads and their sources
//
//   - chat: a few system prompts under many conversations. 4 system prompts
//     of 256-2,048 tokens (log-uniform; an assumption: deployed chat
//     assistants' system prompts run from a few hundred to a few thousand
//     tokens), chosen per conversation with Zipf weights 1/(k+1) (assumption).
//     Turns as `sched.Workloads["chat"]` (ShareGPT as reported by the vLLM
//     paper, Kwon et al. SOSP 2023, Fig. 11: prompt and answer log-normal with
//     means 161 and 338 tokens, sigma of the log 1.0, geometric turns with
//     mean 4 and at most 20, a 16K cap: the last three assumptions). The turns
//     of all conversations are interleaved by popping a random ready
//     conversation, as SGLang's benchmark/hicache/bench_multiturn.py does
//     with its default `--ready-queue-policy random`.
//   - docqa: several questions per long document, after LMCache's
//     benchmarks/long_doc_qa/long_doc_qa.py (itself adapted from vLLM's
//     benchmark_long_document_qa_throughput.py): 8 documents
//     (`--num-documents` 8) of 20,000 tokens (`--document-length` 20000),
//     each opened by its own id token so that no document is a prefix of
//     another (as the script prepends the document id), answers of 100
//     tokens (`--output-len` 100). The script repeats each document prompt
//     `--repeat-count` 2 times; here each repeat carries its own question (4
//     per document, 20-60 tokens: assumptions), and each question is its own
//     chat request (a session of its own), as the script sends each prompt as
//     a fresh `messages=[user]` call. Order: a warm-up round with each
//     document's first question in document order, then the other questions
//     shuffled (the script's warm-up round and default `--repeat-mode
//     random`).
//   - agent: branching agent traces, after SGLang's
//     benchmark/tree_of_thought_deep/bench_sglang.py (four levels: propose a
//     plan, execute it, reflect, answer; each level appends a fixed user
//     instruction and forks `num_branches` = 2 generations of at most 256
//     tokens) and benchmark/hicache/bench_multiturn.py (a turn appends its
//     answer and the next input to the history). 32 traces under one agent
//     system prompt of 2,048 tokens (tool definitions; assumption), a task of
//     40-120 tokens (GSM8K-sized; assumption), level instructions of 20-60
//     tokens drawn once (the script's instructions are 30-60 words), answers
//     uniform in 64-256 tokens (assumption under the script's max_tokens
//     256). The b forks of a node share one prompt: the first branch
//     continues the parent's session, the others start sessions of their own
//     (a conversation-id store cannot fork). Traces run one after another,
//     each level by level, as the script's tree_search does.
//
// # Unique groups and hits
//
// Count cuts every saved token list into groups of G tokens from position
// 0 and keeps the set of their chain keys (state.Chain, a fixed namespace
// and identity): the number of distinct keys is the number of groups a
// store that keeps each prefix group once must hold, independent of any
// store. Logical groups are what the requests hand over (every full group
// of every saved list); per-session tokens are what a conversation-id store
// keeps (each session's last saved list, once). Hits replays the requests
// in order: a request's shared hit is its prompt's longest group-aligned
// prefix whose keys earlier requests saved (what a token lookup answers),
// its session hit the length of its session's previous saved list (what a
// restore by conversation id gives). The tests check the key count against
// a trie of token groups built without hashing.
package prefixwl
