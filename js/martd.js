/* martd browser library: placeholder until written */
var martd = {};
