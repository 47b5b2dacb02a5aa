// render: Go's text/template, as an ingress controller runs it, for the
// tests (t/test_annotations.py), standard library only (Go 1.19).
//
//	render TEMPLATE DATA.json      renders TEMPLATE with DATA into stdout
//	render -nic TEMPLATE DATA.json the same with the F5 NGINX Ingress
//	                               Controller's data and functions
//	render -nic-5.4 TEMPLATE DATA.json  its data before 5.5.0 (a location
//	                               has no Internal)
//	render -parse-only TEMPLATE    parses TEMPLATE, every function it calls
//	                               that is not below stubbed, and exits 0
//	                               if it parses
//
// The functions are those ngx-infer.tmpl and the tests' stand-in of the
// controller's template use, with the behaviour ingress-nginx's
// internal/ingress/controller/template/template.go gives them at
// controller-v1.15.1 (reimplemented here from that behaviour):
//
//	quote                Go's %q of the value (a string, a fmt.Stringer,
//	                     a *string; anything else printed with %v)
//	escapeLiteralDollar  every "$" of a string replaced by
//	                     "${literal_dollar}"; "" for anything else
//	empty                true unless the value is a non-empty string
//	contains             strings.Contains
//	getIngressInformation  the controller's takes the location's Ingress,
//	                     the host and the path and returns what the
//	                     template reads of that Ingress; here the data
//	                     hold that already (Locations[].Ing), so it
//	                     returns its first argument, or an empty one
//
// With -nic, the functions are those of nginx/kubernetes-ingress's
// internal/configs/version1/template_helper.go (v5.5.4) that the tests'
// stand-in of its nginx.ingress.tmpl calls:
//
//	replaceAll        strings.ReplaceAll
//	contains          strings.Contains
//	makeLocationPath  the location's path as it is (the controller's adds
//	                  a modifier for nginx.org/path-regex; not used here)
//
// The data are typed as the controller's are, so that index of a missing
// annotation is "" (a map[string]string), as it is in the controller.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"text/template"
)

// What the tests' stand-in template reads: a subset of the controller's
// config.TemplateConfig and of its ingressInformation, by the same names.
type configuration struct {
	MainSnippet string
	HTTPSnippet string
}

type templateConfig struct {
	Cfg configuration
}

type ingressInformation struct {
	Namespace   string
	Path        string
	Rule        string
	Service     string
	ServicePort string
	Annotations map[string]string
}

type location struct {
	Path    string
	Backend string
	Ing     *ingressInformation
}

type data struct {
	All       templateConfig
	Locations []location
}

// The F5 NGINX Ingress Controller's version1.IngressNginxConfig, the part
// the stand-in reads, by the same names.
type nicIngress struct {
	Name        string
	Namespace   string
	Annotations map[string]string
}

type nicUpstreamServer struct {
	Address     string
	MaxFails    int
	MaxConns    int
	FailTimeout string
}

type nicUpstream struct {
	Name             string
	UpstreamServers  []nicUpstreamServer
	LBMethod         string
	UpstreamZoneSize string
}

type nicLocation struct {
	Path          string
	Upstream      nicUpstream
	ProxyPass     string
	Rewrite       string
	SSL           bool
	GRPC          bool
	Internal      bool
	ServiceName   string
	MinionIngress *nicIngress
}

// a location before 5.0.0 to 5.4.x: no Internal (the template must not
// read it)
type nicLocationOld struct {
	Path          string
	Upstream      nicUpstream
	ProxyPass     string
	Rewrite       string
	SSL           bool
	GRPC          bool
	ServiceName   string
	MinionIngress *nicIngress
}

type nicServerOld struct {
	Name      string
	Ports     []int
	Locations []nicLocationOld
}

type nicConfigOld struct {
	Upstreams []nicUpstream
	Servers   []nicServerOld
	Keepalive string
	Ingress   nicIngress
}

type nicServer struct {
	Name      string
	Ports     []int
	Locations []nicLocation
}

type nicConfig struct {
	Upstreams []nicUpstream
	Servers   []nicServer
	Keepalive string
	Ingress   nicIngress
}

var nicFuncs = template.FuncMap{
	"replaceAll": strings.ReplaceAll,
	"contains":   strings.Contains,
	"makeLocationPath": func(l interface{}, a map[string]string) string {
		switch v := l.(type) {
		case nicLocation:
			return v.Path
		case *nicLocation:
			return v.Path
		case nicLocationOld:
			return v.Path
		case *nicLocationOld:
			return v.Path
		}
		return ""
	},
}

func quote(input interface{}) string {
	var s string

	switch v := input.(type) {
	case string:
		s = v
	case fmt.Stringer:
		s = v.String()
	case *string:
		if v != nil {
			s = *v
		}
	default:
		s = fmt.Sprintf("%v", v)
	}

	return fmt.Sprintf("%q", s)
}

func escapeLiteralDollar(input interface{}) string {
	s, ok := input.(string)
	if !ok {
		return ""
	}

	return strings.ReplaceAll(s, "$", "${literal_dollar}")
}

func empty(input interface{}) bool {
	s, ok := input.(string)
	if ok {
		return s == ""
	}

	return true
}

func getIngressInformation(i, h, p interface{}) *ingressInformation {
	info, ok := i.(*ingressInformation)
	if !ok || info == nil {
		return &ingressInformation{}
	}

	return info
}

var funcs = template.FuncMap{
	"quote":               quote,
	"escapeLiteralDollar": escapeLiteralDollar,
	"empty":               empty,
	"contains":            strings.Contains,

	"getIngressInformation": getIngressInformation,
}

var undefined = regexp.MustCompile(`function "([^"]+)" not defined`)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "render: "+format+"\n", args...)
	os.Exit(1)
}

// parseOnly parses a whole controller template: a function it calls that
// is not one of ours gets a stub, so that what is checked is the
// template's syntax and its variables' scopes (an undefined $ing is a
// parse error), at most 1000 stubs.
func parseOnly(name string, text string) {
	fm := template.FuncMap{}
	for k, v := range funcs {
		fm[k] = v
	}

	for i := 0; i < 1000; i++ {
		_, err := template.New(name).Funcs(fm).Parse(text)
		if err == nil {
			fmt.Printf("parsed, %d functions stubbed\n", i)
			return
		}

		m := undefined.FindStringSubmatch(err.Error())
		if m == nil {
			fail("%v", err)
		}

		fm[m[1]] = func(args ...interface{}) interface{} { return nil }
	}

	fail("%s: more than 1000 undefined functions", name)
}

func main() {
	args := os.Args[1:]

	if len(args) == 2 && args[0] == "-parse-only" {
		text, err := os.ReadFile(args[1])
		if err != nil {
			fail("%v", err)
		}
		parseOnly(args[1], string(text))
		return
	}

	nic := len(args) == 3 && (args[0] == "-nic" || args[0] == "-nic-5.4")
	old := nic && args[0] == "-nic-5.4"
	if nic {
		args = args[1:]
	}

	if len(args) != 2 {
		fail("usage: render [-nic] TEMPLATE DATA.json | " +
			"render -parse-only TEMPLATE")
	}

	text, err := os.ReadFile(args[0])
	if err != nil {
		fail("%v", err)
	}

	raw, err := os.ReadFile(args[1])
	if err != nil {
		fail("%v", err)
	}

	var d interface{} = &data{}
	fm := funcs
	// the controllers' own names for their templates
	name := "nginx.tmpl"
	if old {
		d = &nicConfigOld{}
		fm = nicFuncs
		name = "nginx.ingress.tmpl"
	} else if nic {
		d = &nicConfig{}
		fm = nicFuncs
		name = "nginx.ingress.tmpl"
	}

	dec := json.NewDecoder(strings.NewReader(string(raw)))
	dec.DisallowUnknownFields()
	if err := dec.Decode(d); err != nil {
		fail("%s: %v", args[1], err)
	}

	t, err := template.New(name).Funcs(fm).Parse(string(text))
	if err != nil {
		fail("%v", err)
	}

	if err := t.Execute(os.Stdout, d); err != nil {
		fail("%v", err)
	}
}
