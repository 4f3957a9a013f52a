// render: renders a Helm chart the way `helm template` does, for environments
// without Helm: Go's text/template with Sprig, plus Helm's own `include`,
// `toYaml` and `required`. Usage:
//
//	GOPATH=/usr/share/gocode GO111MODULE=off go run render.go CHART_DIR RELEASE NAMESPACE [values.yaml]
//
// Templates whose name starts with `_` only define helpers; NOTES.txt is
// rendered to stderr. Output: every manifest, separated by `---`.
package main

import (
	"bytes"
	"fmt"
	"io/ioutil"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v2"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "render: "+format+"\n", args...)
	os.Exit(1)
}

// normalize turns yaml.v2's map[interface{}]interface{} into map[string]interface{}.
func normalize(v interface{}) interface{} {
	switch t := v.(type) {
	case map[interface{}]interface{}:
		m := map[string]interface{}{}
		for k, val := range t {
			m[fmt.Sprint(k)] = normalize(val)
		}
		return m
	case []interface{}:
		for i := range t {
			t[i] = normalize(t[i])
		}
	}
	return v
}

func merge(dst, src map[string]interface{}) {
	for k, v := range src {
		if sm, ok := v.(map[string]interface{}); ok {
			if dm, ok := dst[k].(map[string]interface{}); ok {
				merge(dm, sm)
				continue
			}
		}
		dst[k] = v
	}
}

func loadYAML(path string) map[string]interface{} {
	b, err := ioutil.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	var raw interface{}
	if err := yaml.Unmarshal(b, &raw); err != nil {
		fail("%s: %v", path, err)
	}
	if raw == nil {
		return map[string]interface{}{}
	}
	m, ok := normalize(raw).(map[string]interface{})
	if !ok {
		fail("%s: not a mapping", path)
	}
	return m
}

func main() {
	if len(os.Args) < 4 {
		fail("usage: render CHART_DIR RELEASE NAMESPACE [values.yaml]")
	}
	chartDir, release, namespace := os.Args[1], os.Args[2], os.Args[3]
	values := loadYAML(filepath.Join(chartDir, "values.yaml"))
	if len(os.Args) > 4 {
		merge(values, loadYAML(os.Args[4]))
	}
	chart := loadYAML(filepath.Join(chartDir, "Chart.yaml"))
	chartCtx := map[string]interface{}{}
	for k, v := range chart {
		chartCtx[strings.ToUpper(k[:1])+k[1:]] = v
	}
	ctx := map[string]interface{}{
		"Values":  values,
		"Release": map[string]interface{}{"Name": release, "Namespace": namespace, "Service": "Helm", "IsInstall": true},
		"Chart":   chartCtx,
		"Capabilities": map[string]interface{}{
			"KubeVersion": map[string]interface{}{"Version": "v1.20.2", "Major": "1", "Minor": "20"},
		},
	}
	root := template.New("chart")
	funcs := sprig.TxtFuncMap()
	funcs["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		err := root.ExecuteTemplate(&buf, name, data)
		return buf.String(), err
	}
	funcs["toYaml"] = func(v interface{}) string {
		b, err := yaml.Marshal(v)
		if err != nil {
			return ""
		}
		return strings.TrimSuffix(string(b), "\n")
	}
	funcs["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil || v == "" {
			return nil, fmt.Errorf("%s", msg)
		}
		return v, nil
	}
	root.Funcs(funcs).Option("missingkey=zero")
	files, _ := filepath.Glob(filepath.Join(chartDir, "templates", "*"))
	sort.Strings(files)
	for _, f := range files {
		b, err := ioutil.ReadFile(f)
		if err != nil {
			fail("%v", err)
		}
		if _, err := root.New(filepath.Base(f)).Parse(string(b)); err != nil {
			fail("%s: %v", f, err)
		}
	}
	var docs []string
	for _, f := range files {
		name := filepath.Base(f)
		if strings.HasPrefix(name, "_") {
			continue
		}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, ctx); err != nil {
			fail("%s: %v", name, err)
		}
		if name == "NOTES.txt" {
			fmt.Fprint(os.Stderr, buf.String())
			continue
		}
		for _, d := range strings.Split(buf.String(), "\n---") {
			if strings.TrimSpace(strings.Trim(d, "-")) != "" {
				docs = append(docs, "# Source: "+name+"\n"+strings.TrimLeft(d, "-\n"))
			}
		}
	}
	fmt.Println(strings.Join(docs, "\n---\n"))
}
