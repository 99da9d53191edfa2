package model

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/hcache/hcache/internal/half"
)

// The safetensors format: an 8-byte little-endian header length N, N bytes
// of JSON mapping tensor names to {dtype, shape, data_offsets} (offsets
// relative to the end of the header), then the data. A sharded model has
// model.safetensors.index.json whose weight_map names the file of each tensor.

// MaxHeaderBytes bounds a safetensors JSON header.
const MaxHeaderBytes = 100 << 20

// ErrSafetensors is wrapped by format errors.
var ErrSafetensors = errors.New("model: bad safetensors")

type tensorInfo struct {
	DType   string   `json:"dtype"`
	Shape   []int64  `json:"shape"`
	Offsets [2]int64 `json:"data_offsets"`
}

// stFile is one open safetensors file.
type stFile struct {
	path    string
	f       *os.File
	base    int64
	tensors map[string]tensorInfo
}

func openST(path string) (*stFile, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("model: %w", err)
	}
	st, err := parseSTHeader(f, path)
	if err != nil {
		f.Close()
		return nil, err
	}
	st.f = f
	return st, nil
}

// parseSTHeader reads and validates the header of r.
func parseSTHeader(r io.ReaderAt, path string) (*stFile, error) {
	var lb [8]byte
	if _, err := r.ReadAt(lb[:], 0); err != nil {
		return nil, fmt.Errorf("%w: %s: header length: %v", ErrSafetensors, path, err)
	}
	n := binary.LittleEndian.Uint64(lb[:])
	if n < 2 || n > MaxHeaderBytes {
		return nil, fmt.Errorf("%w: %s: header of %d bytes", ErrSafetensors, path, n)
	}
	hdr := make([]byte, n)
	if _, err := r.ReadAt(hdr, 8); err != nil {
		return nil, fmt.Errorf("%w: %s: header: %v", ErrSafetensors, path, err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(hdr, &raw); err != nil {
		return nil, fmt.Errorf("%w: %s: header JSON: %v", ErrSafetensors, path, err)
	}
	st := &stFile{path: path, base: 8 + int64(n), tensors: map[string]tensorInfo{}}
	for name, v := range raw {
		if name == "__metadata__" {
			continue
		}
		var ti tensorInfo
		if err := json.Unmarshal(v, &ti); err != nil {
			return nil, fmt.Errorf("%w: %s: tensor %q: %v", ErrSafetensors, path, name, err)
		}
		es := elemSize(ti.DType)
		if es == 0 {
			return nil, fmt.Errorf("%w: %s: tensor %q has dtype %q (F16, BF16 and F32 are read)", ErrSafetensors, path, name, ti.DType)
		}
		count := int64(1)
		for _, d := range ti.Shape {
			if d < 0 || d > 1<<40 || (d > 0 && count > math.MaxInt64/d) {
				return nil, fmt.Errorf("%w: %s: tensor %q shape %v", ErrSafetensors, path, name, ti.Shape)
			}
			count *= d
		}
		if ti.Offsets[0] < 0 || ti.Offsets[1]-ti.Offsets[0] != count*es {
			return nil, fmt.Errorf("%w: %s: tensor %q: offsets %v do not match shape %v of %s", ErrSafetensors, path, name, ti.Offsets, ti.Shape, ti.DType)
		}
		st.tensors[name] = ti
	}
	return st, nil
}

func elemSize(dt string) int64 {
	switch dt {
	case "F16", "BF16":
		return 2
	case "F32":
		return 4
	}
	return 0
}

// read loads one tensor as float32.
func (st *stFile) read(name string) ([]float32, []int64, error) {
	ti, ok := st.tensors[name]
	if !ok {
		return nil, nil, fmt.Errorf("model: %s: tensor %q not found", st.path, name)
	}
	raw := make([]byte, ti.Offsets[1]-ti.Offsets[0])
	if _, err := st.f.ReadAt(raw, st.base+ti.Offsets[0]); err != nil {
		return nil, nil, fmt.Errorf("%w: %s: tensor %q data: %v", ErrSafetensors, st.path, name, err)
	}
	out := make([]float32, len(raw)/int(elemSize(ti.DType)))
	switch ti.DType {
	case "F16":
		half.Decode(out, raw)
	case "BF16":
		for i := range out {
			out[i] = half.BF16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))
		}
	case "F32":
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
	}
	return out, ti.Shape, nil
}

// TensorSet reads named tensors from a model directory: model.safetensors,
// or the shards listed by model.safetensors.index.json. Only the tensors
// asked for are read.
type TensorSet struct {
	files  map[string]*stFile
	lookup map[string]*stFile
}

// OpenTensors opens the safetensors files of dir.
func OpenTensors(dir string) (*TensorSet, error) {
	ts := &TensorSet{files: map[string]*stFile{}, lookup: map[string]*stFile{}}
	idxPath := filepath.Join(dir, "model.safetensors.index.json")
	if data, err := os.ReadFile(idxPath); err == nil {
		var idx struct {
			WeightMap map[string]string `json:"weight_map"`
		}
		if err := json.Unmarshal(data, &idx); err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrSafetensors, idxPath, err)
		}
		for name, file := range idx.WeightMap {
			if strings.Contains(file, "/") || strings.Contains(file, "..") {
				ts.Close()
				return nil, fmt.Errorf("%w: %s: shard name %q", ErrSafetensors, idxPath, file)
			}
			st := ts.files[file]
			if st == nil {
				if st, err = openST(filepath.Join(dir, file)); err != nil {
					ts.Close()
					return nil, err
				}
				ts.files[file] = st
			}
			ts.lookup[name] = st
		}
		return ts, nil
	}
	st, err := openST(filepath.Join(dir, "model.safetensors"))
	if err != nil {
		return nil, err
	}
	ts.files["model.safetensors"] = st
	for name := range st.tensors {
		ts.lookup[name] = st
	}
	return ts, nil
}

// Read loads a tensor as float32 and checks its shape.
func (ts *TensorSet) Read(name string, shape ...int64) ([]float32, error) {
	st := ts.lookup[name]
	if st == nil {
		return nil, fmt.Errorf("model: tensor %q not found", name)
	}
	v, got, err := st.read(name)
	if err != nil {
		return nil, err
	}
	if fmt.Sprint(got) != fmt.Sprint(shape) {
		return nil, fmt.Errorf("model: tensor %q has shape %v, the config implies %v", name, got, shape)
	}
	return v, nil
}

// Close closes the files.
func (ts *TensorSet) Close() {
	for _, st := range ts.files {
		st.f.Close()
	}
}

// Tensor is one tensor to write.
type Tensor struct {
	Name  string
	Shape []int64
	Data  []float32
}

// WriteSafetensors writes tensors to path in dtype (F16, BF16 or F32).
func WriteSafetensors(path string, dtype string, tensors []Tensor) error {
	es := elemSize(dtype)
	if es == 0 {
		return fmt.Errorf("model: cannot write dtype %q", dtype)
	}
	sort.Slice(tensors, func(i, j int) bool { return tensors[i].Name < tensors[j].Name })
	hdr := map[string]any{"__metadata__": map[string]string{"format": "pt", "producer": "hcache model synth"}}
	var off int64
	for _, t := range tensors {
		n := int64(len(t.Data)) * es
		hdr[t.Name] = tensorInfo{DType: dtype, Shape: t.Shape, Offsets: [2]int64{off, off + n}}
		off += n
	}
	hb, err := json.Marshal(hdr)
	if err != nil {
		return err
	}
	for len(hb)%8 != 0 {
		hb = append(hb, ' ')
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	var lb [8]byte
	binary.LittleEndian.PutUint64(lb[:], uint64(len(hb)))
	if _, err := f.Write(append(lb[:], hb...)); err != nil {
		return err
	}
	for _, t := range tensors {
		buf := make([]byte, int64(len(t.Data))*es)
		for i, v := range t.Data {
			switch dtype {
			case "F16":
				binary.LittleEndian.PutUint16(buf[2*i:], half.FromFloat32(v))
			case "BF16":
				binary.LittleEndian.PutUint16(buf[2*i:], half.BF16FromFloat32(v))
			case "F32":
				binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(v))
			}
		}
		if _, err := f.Write(buf); err != nil {
			return err
		}
	}
	return f.Sync()
}

// STDType maps a config dtype to the safetensors dtype.
func STDType(dtype string) string {
	switch dtype {
	case "bfloat16":
		return "BF16"
	case "float32":
		return "F32"
	}
	return "F16"
}

// ParseSafetensorsHeader validates the header of a safetensors image held in
// data and returns its tensor names (the fuzz target's entry point).
func ParseSafetensorsHeader(data []byte) ([]string, error) {
	st, err := parseSTHeader(bytes.NewReader(data), "<memory>")
	if err != nil {
		return nil, err
	}
	names := make([]string, 0, len(st.tensors))
	for n := range st.tensors {
		names = append(names, n)
	}
	sort.Strings(names)
	return names, nil
}
