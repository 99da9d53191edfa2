package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"math"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/hcache/hcache/chunk"
	hcachev1 "github.com/hcache/hcache/proto/hcache/v1"
	"github.com/hcache/hcache/serve"
	"github.com/hcache/hcache/state"
	"github.com/hcache/hcache/state/codec"
)

// Codecs on the wire (daemon doc, Codecs): the client encodes the rows it
// appends under its identity's codec (state/codec) and the daemon stores
// them as given, bound to that codec; a restore hands them back as stored
// unless the request sets decode (or project), and then in the model dtype.

// codecFrom maps the wire codec to the store's. A value this build does not
// know stays unknown (Identity.Validate refuses it by number), never wraps
// onto a known one.
func codecFrom(c hcachev1.Codec) state.Codec {
	if c < 0 || c > math.MaxUint8 {
		return state.Codec(math.MaxUint8)
	}
	return state.Codec(c)
}

// mismatchErr explains an identity mismatch of a request on context ns/id
// when the stored identity differs only, or also, in its codec: the store's
// error names the context, this names both codecs. Any other error, or a
// mismatch not about the codec, is returned unchanged.
func (s *Server) mismatchErr(err error, ns, id string, ident *chunk.Identity) error {
	if err == nil || ident == nil || id == "" || !errors.Is(err, chunk.ErrIdentityMismatch) {
		return err
	}
	ci, cerr := s.store.Context(ns, id)
	if cerr != nil || ci.Identity == nil || ci.Identity.Codec == ident.Codec {
		return err
	}
	return fmt.Errorf("%w: context %s/%s is stored under codec %s, the request's identity has codec %s (a state is served only in the encoding it was stored in: ask under codec %s, and set decode for rows in the model dtype)",
		chunk.ErrIdentityMismatch, ns, id, ci.Identity.Codec, ident.Codec, ci.Identity.Codec)
}

// layerDecoder returns what a restore applies to each layer before sending
// it: nil when rows go out as stored (no decode asked, codec none, or a
// projected restore, whose pipeline decodes itself). Decoding needs the
// layout of the rows, so the identity's model must be loaded on the daemon
// (FAILED_PRECONDITION otherwise, as for project).
func (s *Server) layerDecoder(ident *chunk.Identity, decode, project bool) (func(*serve.StreamLayer) error, error) {
	if !decode || project || ident.Codec == state.CodecNone {
		return nil, nil
	}
	var m *Model
	for _, lm := range s.cfg.Models {
		if bytes.Equal(lm.Fingerprint, ident.Model) {
			m = lm
			break
		}
	}
	if m == nil {
		return nil, status.Errorf(codes.FailedPrecondition, "decode: rows under codec %s decode only for a model loaded on the daemon (start hcached with --model NAME=DIR of the same weights), or restore them as stored and decode them in the client (state/codec)", ident.Codec)
	}
	c := m.Config
	if err := serve.CheckPlanCodec(c, ident.Plan, ident.Codec); err != nil {
		return nil, status.Error(codes.FailedPrecondition, "decode: "+err.Error())
	}
	return func(l *serve.StreamLayer) error {
		segs, vals, rb := 1, c.HiddenSize, c.HiddenRowBytes()
		if l.Kind == state.LayerKV {
			segs, vals, rb = 2, c.KVDim(), c.KVRowBytes()
		}
		out := make([]byte, l.Tokens*rb)
		if err := codec.TranscodeRows(ident.Codec, c.DType, out, l.Rows, segs, vals); err != nil {
			return status.Errorf(codes.DataLoss, "decode layer %d (%s rows under codec %s): %v", l.Layer, l.Kind, ident.Codec, err)
		}
		l.Rows, l.RowBytes = out, rb
		return nil
	}, nil
}

// rowsCodec is the encoding of the rows a restore sends.
func rowsCodec(ident *chunk.Identity, decode, project bool) hcachev1.Codec {
	if decode || project {
		return hcachev1.Codec_CODEC_NONE
	}
	return hcachev1.Codec(ident.Codec)
}

// forkCutsGroup refuses a fork of an int8 context at a token count inside
// one of its whole 64-token groups: the fork would copy the group's first
// rows without the rows that carry the rest of its scales, rows no restore
// could decode. A count on a group boundary, or inside the source's last,
// partial group (token rows, each whole by itself), is fine.
func forkCutsGroup(info chunk.ContextInfo, tokens uint64) error {
	if info.Identity == nil || info.Identity.Codec != state.CodecInt8Channel {
		return nil
	}
	const g = codec.Int8Group
	if tokens%g == 0 || info.Tokens < (tokens/g+1)*g {
		return nil
	}
	return status.Errorf(codes.InvalidArgument, "fork of %d tokens of %s/%s, stored under codec int8: the count cuts the 64-token group of tokens %d..%d, whose rows decode only together (fork at a multiple of 64)",
		tokens, info.Namespace, info.ID, tokens/g*g, tokens/g*g+g-1)
}
