// Builds helm from the published helm.sh/helm/v3 module.
// Bump together with tools/versions.env.
module edgeslim/tools/helm

go 1.26.0

tool helm.sh/helm/v3/cmd/helm

require helm.sh/helm/v3 v3.22.0
