// Command helm_render renders a Helm 3 chart offline, for the chart tests (no helm binary).
//
// It follows what `helm template` does with Go's text/template: the sprig function map
// (without env/expandenv, as in Helm) plus Helm's own include, tpl, required, toYaml,
// fromYaml, toJson, fromJson and lookup (always empty, as in `helm template`); values read
// the way Helm reads them (YAML through JSON, so numbers are float64) and overridden by
// each -f file in turn (maps merged, null deletes a key); .Values, .Release, .Chart,
// .Capabilities, .Template and .Files as Helm exposes them. Every templates/*.yaml,
// *.yml, *.tpl and NOTES.txt is parsed into one template set; files whose name starts
// with "_" only define templates. The manifests are printed as one multi-document YAML
// stream, each with a "# Source:" comment; -notes prints the rendered NOTES.txt instead.
//
// Build (Debian's golang-go, golang-github-masterminds-sprig-dev, golang-gopkg-yaml.v2-dev):
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o helm_render main.go
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/semver"
	"github.com/Masterminds/sprig"
	yaml "gopkg.in/yaml.v2"
)

const maxIncludeDepth = 1000

type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ",") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

// Metadata is Chart.yaml as .Chart exposes it (the fields a chart's templates use).
type Metadata struct {
	APIVersion  string            `yaml:"apiVersion"`
	Name        string            `yaml:"name"`
	Version     string            `yaml:"version"`
	KubeVersion string            `yaml:"kubeVersion"`
	Description string            `yaml:"description"`
	Type        string            `yaml:"type"`
	Keywords    []string          `yaml:"keywords"`
	Home        string            `yaml:"home"`
	Sources     []string          `yaml:"sources"`
	Icon        string            `yaml:"icon"`
	AppVersion  string            `yaml:"appVersion"`
	Deprecated  bool              `yaml:"deprecated"`
	Annotations map[string]string `yaml:"annotations"`
}

// KubeVersion is .Capabilities.KubeVersion.
type KubeVersion struct {
	Version    string
	Major      string
	Minor      string
	GitVersion string
}

func (k KubeVersion) String() string { return k.Version }

// VersionSet is .Capabilities.APIVersions.
type VersionSet []string

// Has tells whether an API group/version (or group/version/Kind) is available.
func (v VersionSet) Has(apiVersion string) bool {
	for _, x := range v {
		if x == apiVersion {
			return true
		}
	}
	return false
}

// Capabilities is .Capabilities.
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions VersionSet
}

// Files is .Files: the chart's non-template files.
type Files map[string][]byte

// Get returns a file's content, or "" when the chart has no such file.
func (f Files) Get(name string) string { return string(f[name]) }

// GetBytes returns a file's content as bytes.
func (f Files) GetBytes(name string) []byte { return f[name] }

var defaultAPIVersions = []string{
	"v1", "apps/v1", "batch/v1", "autoscaling/v1", "autoscaling/v2", "policy/v1",
	"networking.k8s.io/v1", "rbac.authorization.k8s.io/v1", "storage.k8s.io/v1",
	"scheduling.k8s.io/v1", "coordination.k8s.io/v1", "discovery.k8s.io/v1",
}

func die(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "helm_render: "+format+"\n", args...)
	os.Exit(1)
}

// normalize turns yaml.v2's map[interface{}]interface{} into JSON-friendly maps.
func normalize(v interface{}) interface{} {
	switch x := v.(type) {
	case map[interface{}]interface{}:
		out := make(map[string]interface{}, len(x))
		for k, val := range x {
			out[fmt.Sprint(k)] = normalize(val)
		}
		return out
	case []interface{}:
		for i := range x {
			x[i] = normalize(x[i])
		}
		return x
	default:
		return v
	}
}

// readValues reads YAML the way Helm does: YAML -> JSON -> map (numbers become float64).
func readValues(data []byte) (map[string]interface{}, error) {
	var raw interface{}
	if err := yaml.Unmarshal(data, &raw); err != nil {
		return nil, err
	}
	if raw == nil {
		return map[string]interface{}{}, nil
	}
	js, err := json.Marshal(normalize(raw))
	if err != nil {
		return nil, err
	}
	out := map[string]interface{}{}
	if err := json.Unmarshal(js, &out); err != nil {
		return nil, fmt.Errorf("values must be a mapping: %w", err)
	}
	return out, nil
}

// coalesce merges override into base like Helm: maps merge, null deletes, the rest replaces.
func coalesce(base, override map[string]interface{}) map[string]interface{} {
	for key, val := range override {
		if val == nil {
			delete(base, key)
			continue
		}
		sub, isMap := val.(map[string]interface{})
		baseSub, baseIsMap := base[key].(map[string]interface{})
		if isMap && baseIsMap {
			base[key] = coalesce(baseSub, sub)
		} else {
			base[key] = val
		}
	}
	return base
}

func toYAML(v interface{}) string {
	js, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var generic interface{}
	if err := yaml.Unmarshal(js, &generic); err != nil {
		return ""
	}
	out, err := yaml.Marshal(generic)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(out), "\n")
}

func fromYAML(s string) map[string]interface{} {
	m, err := readValues([]byte(s))
	if err != nil {
		return map[string]interface{}{"Error": err.Error()}
	}
	return m
}

func toJSON(v interface{}) string {
	out, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(out)
}

func fromJSON(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

func required(warn string, val interface{}) (interface{}, error) {
	if val == nil {
		return val, errors.New(warn)
	}
	if s, ok := val.(string); ok && s == "" {
		return val, errors.New(warn)
	}
	return val, nil
}

// engine holds the parsed template set and Helm's template-aware functions.
type engine struct {
	root     *template.Template
	depth    int
	missing  string
	basePath string
}

func (e *engine) funcs() template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env")
	delete(f, "expandenv")
	f["toYaml"] = toYAML
	f["fromYaml"] = fromYAML
	f["toJson"] = toJSON
	f["fromJson"] = fromJSON
	f["required"] = required
	f["lookup"] = func(string, string, string, string) (map[string]interface{}, error) {
		return map[string]interface{}{}, nil
	}
	f["include"] = e.include
	f["tpl"] = e.tpl
	return f
}

func (e *engine) include(name string, data interface{}) (string, error) {
	if e.depth > maxIncludeDepth {
		return "", fmt.Errorf("rendering template has a nested reference name: %s", name)
	}
	e.depth++
	defer func() { e.depth-- }()
	var buf bytes.Buffer
	if err := e.root.ExecuteTemplate(&buf, name, data); err != nil {
		return "", err
	}
	return buf.String(), nil
}

func (e *engine) tpl(text string, data interface{}) (string, error) {
	clone, err := e.root.Clone()
	if err != nil {
		return "", err
	}
	t, err := clone.New("tpl").Option("missingkey=" + e.missing).Parse(text)
	if err != nil {
		return "", fmt.Errorf("cannot parse template %q: %w", text, err)
	}
	var buf bytes.Buffer
	if err := t.Execute(&buf, data); err != nil {
		return "", fmt.Errorf("error calling tpl: %w", err)
	}
	return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
}

func loadChart(dir string) Metadata {
	data, err := os.ReadFile(filepath.Join(dir, "Chart.yaml"))
	if err != nil {
		die("%v", err)
	}
	var meta Metadata
	if err := yaml.UnmarshalStrict(data, &meta); err != nil {
		die("Chart.yaml: %v", err)
	}
	if meta.APIVersion != "v2" {
		die("Chart.yaml: apiVersion must be v2 (Helm 3), got %q", meta.APIVersion)
	}
	if meta.Name == "" || meta.Version == "" {
		die("Chart.yaml: name and version are required")
	}
	if _, err := semver.StrictNewVersion(meta.Version); err != nil {
		die("Chart.yaml: version %q is not SemVer 2: %v", meta.Version, err)
	}
	if meta.Type != "" && meta.Type != "application" && meta.Type != "library" {
		die("Chart.yaml: unknown type %q", meta.Type)
	}
	return meta
}

func kubeVersion(v string, meta Metadata) KubeVersion {
	parsed, err := semver.NewVersion(v)
	if err != nil {
		die("bad -kube-version %q: %v", v, err)
	}
	if meta.KubeVersion != "" {
		constraint, err := semver.NewConstraint(meta.KubeVersion)
		if err != nil {
			die("Chart.yaml: bad kubeVersion %q: %v", meta.KubeVersion, err)
		}
		if !constraint.Check(parsed) {
			die("chart requires kubeVersion %s, which is incompatible with %s", meta.KubeVersion, v)
		}
	}
	full := "v" + parsed.String()
	return KubeVersion{
		Version:    full,
		Major:      fmt.Sprint(parsed.Major()),
		Minor:      fmt.Sprint(parsed.Minor()),
		GitVersion: full,
	}
}

func readFiles(dir string) Files {
	files := Files{}
	_ = filepath.Walk(dir, func(path string, info os.FileInfo, err error) error {
		if err != nil || info.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(dir, path)
		if strings.HasPrefix(rel, "templates"+string(filepath.Separator)) || rel == "values.yaml" || rel == "Chart.yaml" {
			return nil
		}
		data, err := os.ReadFile(path)
		if err == nil {
			files[filepath.ToSlash(rel)] = data
		}
		return err
	})
	return files
}

var docSeparator = regexp.MustCompile(`(?:^|\s*\n)---\s*`)

func main() {
	var valueFiles, apiVersions stringList
	chartDir := flag.String("chart", "", "chart folder (holds Chart.yaml, values.yaml, templates/)")
	release := flag.String("name", "release", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kube := flag.String("kube-version", "1.31.0", "Kubernetes version for .Capabilities")
	strict := flag.Bool("strict", false, "fail on a missing value key (missingkey=error)")
	notes := flag.Bool("notes", false, "print the rendered NOTES.txt instead of the manifests")
	flag.Var(&valueFiles, "f", "values file applied over values.yaml (repeatable)")
	flag.Var(&apiVersions, "api-versions", "extra API version for .Capabilities.APIVersions (repeatable)")
	flag.Parse()
	if *chartDir == "" {
		die("-chart is required")
	}
	meta := loadChart(*chartDir)

	data, err := os.ReadFile(filepath.Join(*chartDir, "values.yaml"))
	if err != nil {
		die("%v", err)
	}
	values, err := readValues(data)
	if err != nil {
		die("values.yaml: %v", err)
	}
	for _, name := range valueFiles {
		data, err := os.ReadFile(name)
		if err != nil {
			die("%v", err)
		}
		override, err := readValues(data)
		if err != nil {
			die("%s: %v", name, err)
		}
		values = coalesce(values, override)
	}

	missing := "zero"
	if *strict {
		missing = "error"
	}
	e := &engine{missing: missing, basePath: meta.Name + "/templates"}
	e.root = template.New("gotpl").Option("missingkey=" + missing).Funcs(e.funcs())

	paths, _ := filepath.Glob(filepath.Join(*chartDir, "templates", "*"))
	sort.Strings(paths)
	var names []string
	for _, path := range paths {
		base := filepath.Base(path)
		ext := filepath.Ext(base)
		if ext != ".yaml" && ext != ".yml" && ext != ".tpl" && base != "NOTES.txt" {
			continue
		}
		text, err := os.ReadFile(path)
		if err != nil {
			die("%v", err)
		}
		name := e.basePath + "/" + base
		if _, err := e.root.New(name).Parse(string(text)); err != nil {
			die("parse error: %v", err)
		}
		if !strings.HasPrefix(base, "_") {
			names = append(names, name)
		}
	}

	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": *release, "Namespace": *namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Chart": meta,
		"Capabilities": &Capabilities{
			KubeVersion: kubeVersion(*kube, meta),
			APIVersions: append(VersionSet(defaultAPIVersions), apiVersions...),
		},
		"Files": readFiles(*chartDir),
	}

	var out bytes.Buffer
	for _, name := range names {
		isNotes := strings.HasSuffix(name, "/NOTES.txt")
		if isNotes != *notes {
			continue
		}
		scope := map[string]interface{}{}
		for k, v := range top {
			scope[k] = v
		}
		scope["Template"] = map[string]interface{}{"Name": name, "BasePath": e.basePath}
		var buf bytes.Buffer
		if err := e.root.ExecuteTemplate(&buf, name, scope); err != nil {
			die("render error: %v", err)
		}
		rendered := strings.ReplaceAll(buf.String(), "<no value>", "")
		if isNotes {
			out.WriteString(rendered)
			continue
		}
		for _, doc := range docSeparator.Split(rendered, -1) {
			if strings.TrimSpace(doc) == "" {
				continue
			}
			fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", name, strings.TrimRight(doc, " \t\n"))
		}
	}
	os.Stdout.Write(out.Bytes())
}
