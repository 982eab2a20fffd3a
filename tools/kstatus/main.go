// Command kstatus prints what Flux's kstatus library (sigs.k8s.io/cli-utils,
// the code Flux, Config Sync and `kubectl wait`-style tooling use) computes for
// one Kubernetes object: it reads the object as JSON on stdin and writes
// {"status": ..., "message": ...} as JSON on stdout. The tests feed it objects
// whose status the operator's own status builder wrote.
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	raw, err := io.ReadAll(os.Stdin)
	if err != nil {
		fail(err)
	}
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(raw); err != nil {
		fail(err)
	}
	res, err := status.Compute(obj)
	if err != nil {
		fail(err)
	}
	out, _ := json.Marshal(map[string]string{
		"status":  res.Status.String(),
		"message": res.Message,
	})
	fmt.Println(string(out))
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "kstatus:", err)
	os.Exit(2)
}
